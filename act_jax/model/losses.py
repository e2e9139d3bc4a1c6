"""Next-token cross-entropy over masked targets (shared by train and eval).

A batch is `{'tokens_bt', 'attention_mask_bt', 'loss_mask_bt'}` (data.py's
`token_mask_bt` is accepted in place of `loss_mask_bt`, and its optional
`positions_bt` / `segment_ids_bt` are used for packed rows: attention stays
inside each document and a target never crosses a document boundary); position t predicts token t+1 and
counts when the TARGET token's loss mask (and attention mask) is 1. Log-softmax in float32 whatever the compute dtype.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from act_jax.model import forward
from act_jax.model import sharding
from act_jax.model.config import ModelConfig

REQUIRED_KEYS = ('tokens_bt', 'attention_mask_bt', 'loss_mask_bt')


def as_loss_batch(batch: dict[str, Any]) -> dict[str, Any]:
  """Renames data.py's `token_mask_bt` to `loss_mask_bt` when needed and
  drops keys the loss does not read."""
  out = dict(batch)
  if 'loss_mask_bt' not in out and 'token_mask_bt' in out:
    out['loss_mask_bt'] = out['token_mask_bt']
  keep = REQUIRED_KEYS + ('positions_bt', 'segment_ids_bt')
  return {k: v for k, v in out.items() if k in keep}


def check_batch(batch: dict[str, Any], where: str = 'batch') -> None:
  """Raises ValueError naming the missing key or the shape mismatch."""
  batch = as_loss_batch(batch)
  missing = [k for k in REQUIRED_KEYS if k not in batch]
  if missing:
    raise ValueError(f'{where}: missing keys {missing}; expected '
                     f'{list(REQUIRED_KEYS)}')
  shape = tuple(batch['tokens_bt'].shape)
  if len(shape) != 2:
    raise ValueError(f'{where}: tokens_bt must be [B, T], got {shape}')
  for k in REQUIRED_KEYS[1:] + tuple(
      k for k in ('positions_bt', 'segment_ids_bt') if k in batch):
    if tuple(batch[k].shape) != shape:
      raise ValueError(f'{where}: {k} has shape {tuple(batch[k].shape)}, '
                       f'tokens_bt has {shape}')


def place_rows(batch: dict[str, Any], mesh, batch_sh
               ) -> tuple[dict[str, jax.Array], int, np.ndarray]:
  """A host loss batch made ready for a scoring program on `mesh`.

  Checked, padded with empty rows so it divides the batch axes, and placed
  as global arrays on `batch_sh` (numpy into sharded in_shardings is refused
  in multi-process runs). Returns `(batch, real row count, [rows] flags:
  any real token)`.
  """
  batch = as_loss_batch(batch)
  check_batch(batch)
  batch = {k: np.asarray(v, np.int32) for k, v in batch.items()}
  real = batch['attention_mask_bt'].any(-1)
  batch, n = sharding.pad_rows(batch, sharding.batch_axes_size(mesh))
  return sharding.put(batch, batch_sh), n, real


def token_logprobs(logits_btv: jax.Array, tokens_bt: jax.Array) -> jax.Array:
  """`log p(tokens[t+1] | ..t)` as `[B, T-1]` float32."""
  logits = logits_btv[:, :-1].astype(jnp.float32)
  targets = tokens_bt[:, 1:]
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return picked - lse


def target_weights(batch: dict[str, jax.Array]) -> jax.Array:
  """`[B, T-1]` float32 weights: target's loss mask AND attention mask (AND
  same document as its context, for packed rows)."""
  w = (batch['loss_mask_bt'][:, 1:].astype(jnp.float32) *
       batch['attention_mask_bt'][:, 1:].astype(jnp.float32))
  seg = batch.get('segment_ids_bt')
  if seg is not None:
    w = w * (seg[:, 1:] == seg[:, :-1]).astype(jnp.float32)
  return w


def _target_logprobs(params, batch: dict[str, jax.Array], cfg: ModelConfig,
                     slices=None, remat: str = 'none'
                     ) -> tuple[jax.Array, jax.Array]:
  """(`[B, T-1]` target log-probs, `[B, T-1]` target weights)."""
  out = forward.apply(params, batch['tokens_bt'], cfg,
                      attention_mask_bt=batch['attention_mask_bt'],
                      positions_bt=batch.get('positions_bt'),
                      segment_ids_bt=batch.get('segment_ids_bt'),
                      slices=slices, remat=remat)
  return token_logprobs(out.logits, batch['tokens_bt']), target_weights(batch)


def nll_sum(params, batch: dict[str, jax.Array], cfg: ModelConfig,
            slices=None, remat: str = 'none') -> tuple[jax.Array, jax.Array]:
  """(sum of next-token NLL over weighted targets, number of targets);
  `slices` as in `forward.apply` (weight gradients of selected slices),
  `remat` as `forward.apply`."""
  lp, w = _target_logprobs(params, batch, cfg, slices, remat)
  return -jnp.sum(lp * w), jnp.sum(w)


def sequence_logprobs(params, batch: dict[str, jax.Array],
                      cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """Per-sequence (sum of target log-probs `[B]`, target count `[B]`)."""
  lp, w = _target_logprobs(params, batch, cfg)
  return jnp.sum(lp * w, axis=-1), jnp.sum(w, axis=-1)
