"""Activation patching: a channel set's causal check that needs no weights.

Run the target and the source side by side on the same tokens (one vmapped
forward of the stacked pair) and, in the selected channels of every layer,
replace the target's activation by the source's at the same token
(`model/hooks.py` 'patch'); everything else of the target runs as is. If
the channels carry the ability, the patched target's loss on that ability's
held-out text moves toward the source's. Recovery is
`(nll_target - nll_patched) / (nll_target - nll_source)` (1 = the source's
loss, 0 = no change), compared against the same number of random channels.

  stack_pair(target, source)        the pair, stacked in the hooks' order
  patch_hooks(mask, cfg)            `{'patch': {site: [L, 2, 2, C]}}`
  patched_sequence_scores(...)      per model and row: (sum of target
                                    log-probs, target count), teacher-forced
  patched_perplexity(...)           the target's (and source's) perplexity
                                    with per-row items, as eval.metrics
The mask's sites are activation sites (the output sites and the '.in'
sites); patching an output site replaces the output of that module, which
is what the transplant of its kernel columns would change first.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from act_jax.model import capture as capture_lib
from act_jax.model import forward
from act_jax.model import losses
from act_jax.model import sharding
from act_jax.model.config import ModelConfig

TARGET, SOURCE = 0, 1  # the stacked pair's order


def patch_hooks(mask: Mapping[str, np.ndarray], cfg: ModelConfig,
                target: int = TARGET, source: int = SOURCE,
                num_models: int = 2) -> dict[str, Any]:
  """Hooks that give `target` the `source`'s activations in `mask`'s
  channels (`{site: [L, C] bool}`); the other models run unpatched."""
  out = {}
  for site, m in mask.items():
    c = capture_lib.site_channels(cfg, site)
    m = np.asarray(m, bool)
    if m.shape != (cfg.num_layers, c):
      raise ValueError(f'patch mask {site}: shape {m.shape}, the model has '
                       f'{(cfg.num_layers, c)}')
    w = np.zeros((cfg.num_layers, num_models, num_models, c), np.float32)
    w[:, target, source] = m
    out[site] = w
  return {'patch': out}


def stack_pair(target, source):
  """The (target, source) pair stacked in the order the hooks expect."""
  return forward.stack_params([target, source])


@functools.lru_cache(maxsize=8)
def _jitted(cfg: ModelConfig, mesh, num_models: int, sites: tuple[str, ...]):
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((num_models,) + x.shape, x.dtype),
      forward.abstract_params(cfg))
  param_sh = sharding.tree_shardings(mesh, forward.logical_axes(cfg),
                                     abstract, prefix=('models',))
  batch_sh = sharding.named_sharding(mesh, ('batch', 'length'))
  rep = sharding.replicated(mesh)
  hook_sh = {'patch': {s: rep for s in sites}}

  def run(stacked, batch, hooks):
    with sharding.activation_sharding(mesh):
      out = forward.apply_models(
          stacked, batch['tokens_bt'], cfg,
          attention_mask_bt=batch['attention_mask_bt'],
          positions_bt=batch.get('positions_bt'),
          segment_ids_bt=batch.get('segment_ids_bt'), hooks=hooks)
    lp_mbt = jax.vmap(losses.token_logprobs, in_axes=(0, None))(
        out.logits, batch['tokens_bt'])
    w_bt = losses.target_weights(batch)
    return jnp.sum(lp_mbt * w_bt[None], -1), jnp.sum(w_bt, -1)

  return (jax.jit(run, in_shardings=(param_sh, batch_sh, hook_sh)), param_sh,
          batch_sh, hook_sh)


def patched_sequence_scores(stacked, cfg: ModelConfig,
                            batches: Sequence[dict[str, np.ndarray]],
                            hooks: dict[str, Any], *, mesh=None
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Teacher-forced scores of every stacked model with `hooks` applied.

  Returns:
    (`[M, N]` sum of target log-probs per row, `[N]` target count, `[N]`
    real-row flags) over the N rows of `batches` (filler rows included,
    flagged False). Every batch is dispatched before any is fetched.
  """
  mesh = mesh or sharding.make_mesh()
  num_models = jax.tree.leaves(stacked)[0].shape[0]
  fn, param_sh, batch_sh, hook_sh = _jitted(cfg, mesh, num_models,
                                            tuple(sorted(hooks['patch'])))
  # Global arrays on the mesh (numpy into sharded in_shardings is refused
  # in multi-process runs); params placed once.
  stacked = sharding.put(stacked, param_sh)
  hooks = sharding.put(hooks, hook_sh)
  pending, real = [], []
  for batch in batches:
    batch, n, rows = losses.place_rows(batch, mesh, batch_sh)
    real.append(rows)
    pending.append((n, fn(stacked, batch, hooks)))
  if not pending:
    raise ValueError('patched_sequence_scores: no batches')
  got = jax.device_get([out for _, out in pending])
  lp = np.concatenate([np.asarray(s)[:, :n] for (n, _), (s, _) in
                       zip(pending, got)], axis=1)
  cnt = np.concatenate([np.asarray(c)[:n] for (n, _), (_, c) in
                        zip(pending, got)])
  return lp, cnt, np.concatenate(real)


def patched_perplexity(stacked, cfg: ModelConfig,
                       batches: Sequence[dict[str, np.ndarray]],
                       hooks: dict[str, Any], *, mesh=None
                       ) -> list[dict[str, Any]]:
  """Per stacked model: `{'ppl', 'nll', 'tokens', 'items': {'nll',
  'tokens'}}` (as `eval.metrics.perplexity`) with `hooks` applied."""
  lp, cnt, real = patched_sequence_scores(stacked, cfg, batches, hooks,
                                          mesh=mesh)
  tok = cnt[real].astype(np.float64)
  if tok.sum() == 0:
    raise ValueError('patched_perplexity: the batches have no target tokens')
  out = []
  for row in lp:
    nll_items = -row[real].astype(np.float64)
    nll = float(nll_items.sum() / tok.sum())
    out.append({'nll': nll, 'ppl': float(np.exp(nll)),
                'tokens': float(tok.sum()),
                'items': {'nll': nll_items.tolist(), 'tokens': tok.tolist()}})
  return out
