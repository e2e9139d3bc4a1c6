"""Batched greedy generation with the KV cache.

Prompts are left-padded `[B, P]` with an attention mask. One jitted program
prefills the cache with the whole prompt, then decodes one token per step
inside a `lax.while_loop` that stops when every row has emitted one of the
`stop_ids` or after `max_new_tokens`. RoPE positions are `cumsum(mask) - 1` for the prompt
and continue from each row's real length, which is what transformers'
`generate` does with left padding, so the tokens equal its greedy output.
Rows that finished are filled with `pad_id`.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from act_jax.model import forward
from act_jax.model import sharding
from act_jax.model.config import ModelConfig


@functools.partial(jax.jit,
                   static_argnames=('cfg', 'max_new_tokens', 'stop_ids',
                                    'pad_id', 'unroll'))
def _generate(params, prompt_bt, mask_bt, *, cfg: ModelConfig,
              max_new_tokens: int, stop_ids: tuple[int, ...], pad_id: int,
              unroll: bool = True):
  batch, plen = prompt_bt.shape
  # The decode loop runs the unrolled layers on weights sliced once per call:
  # it then reads each layer's weights in place, where the scanned layers
  # copied all of them out of the stacked arrays for every token (XLA:CPU).
  # The prefill, one pass, keeps the scan (a quarter of the compile time).
  step_params = forward.unstack_layers(params) if unroll else params
  cache = forward.init_cache(cfg, batch, plen + max_new_tokens)
  kv_valid_bs = jnp.concatenate(
      [mask_bt.astype(jnp.int32),
       jnp.ones((batch, max_new_tokens), jnp.int32)], axis=1)
  out = forward.apply(params, prompt_bt, cfg, attention_mask_bt=mask_bt,
                      cache=cache, cache_index=0, kv_valid_bs=kv_valid_bs)
  lengths_b = jnp.sum(mask_bt.astype(jnp.int32), axis=-1)
  tok_b = jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)
  tokens_bn = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
  done_b = jnp.zeros((batch,), bool)

  def cond(state):
    i, _, _, _, done_b = state
    return (i < max_new_tokens) & ~jnp.all(done_b)

  def body(state):
    i, tok_b, cache, tokens_bn, done_b = state
    tokens_bn = tokens_bn.at[:, i].set(jnp.where(done_b, pad_id, tok_b))
    for s in stop_ids:
      done_b = done_b | (tok_b == s)
    step = forward.apply(
        step_params, tok_b[:, None], cfg,
        attention_mask_bt=jnp.ones((batch, 1), jnp.int32),
        positions_bt=(lengths_b + i)[:, None], cache=cache,
        cache_index=plen + i, kv_valid_bs=kv_valid_bs)
    tok_b = jnp.argmax(step.logits[:, -1], axis=-1).astype(jnp.int32)
    return i + 1, tok_b, step.cache, tokens_bn, done_b

  state = (jnp.zeros((), jnp.int32), tok_b, out.cache, tokens_bn, done_b)
  _, _, _, tokens_bn, _ = jax.lax.while_loop(cond, body, state)
  return tokens_bn


def greedy_generate(params, cfg: ModelConfig, prompt_bt, mask_bt, *,
                    max_new_tokens: int,
                    stop_ids: int | Sequence[int] | None = None,
                    pad_id: int = 0, mesh=None,
                    unroll_decode: bool = True) -> jax.Array:
  """Greedy continuation `[B, max_new_tokens]` of left-padded prompts.

  Args:
    params: model params.
    cfg: model config (its `dtype` is the compute dtype).
    prompt_bt: int `[B, P]` prompts, LEFT-padded.
    mask_bt: `[B, P]` 1 for real prompt tokens.
    max_new_tokens: tokens to generate at most.
    stop_ids: stop a row after it emits one of these ids (None: never stop
      early).
    pad_id: written after a row's stop token.
    mesh: optional mesh: params sharded per logical axes, batch over
      ('data', 'fsdp').
    unroll_decode: decode with unrolled layers on weights sliced once
      (faster per token; False keeps the scanned layers: less compile time,
      no second copy of the layer weights while generating).

  Returns:
    The generated ids `[B, max_new_tokens]` on device (not fetched, so a
    caller can dispatch the next batch first).

  Raises:
    ValueError when a prompt is right-padded or empty.
  """
  if stop_ids is None:
    stop_ids = ()
  elif isinstance(stop_ids, int):
    stop_ids = (stop_ids,)
  stop_ids = tuple(sorted({int(s) for s in stop_ids}))
  prompt_bt = np.asarray(prompt_bt, np.int32)
  mask_bt = np.asarray(mask_bt, np.int32)
  if prompt_bt.shape != mask_bt.shape or prompt_bt.ndim != 2:
    raise ValueError(f'prompt {prompt_bt.shape} and mask {mask_bt.shape} '
                     'must both be [B, P]')
  if (mask_bt[:, -1] == 0).any():
    raise ValueError('prompts must be left-padded with a real last token '
                     f'(rows {np.flatnonzero(mask_bt[:, -1] == 0).tolist()} '
                     'end with padding)')
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens} must be >= 1')
  if mesh is not None:
    params = jax.device_put(params, sharding.tree_shardings(
        mesh, forward.logical_axes(cfg), params))
    bsh = sharding.named_sharding(mesh, ('batch', 'length'), prompt_bt.shape)
    prompt_bt, mask_bt = jax.device_put((prompt_bt, mask_bt), bsh)
    with sharding.activation_sharding(mesh):
      out = _generate(params, prompt_bt, mask_bt, cfg=cfg,
                      max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                      pad_id=pad_id, unroll=unroll_decode)
  else:
    out = _generate(params, prompt_bt, mask_bt, cfg=cfg,
                    max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                    pad_id=pad_id, unroll=unroll_decode)
  return out


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int = 0,
             multiple: int = 8,
             length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads id lists to a common length (`length`, else the longest
  rounded up to `multiple`, so batches of similar length share one compiled
  program)."""
  if not seqs or any(len(s) == 0 for s in seqs):
    raise ValueError('every prompt needs at least one token')
  n = max(len(s) for s in seqs)
  n = -(-n // multiple) * multiple if length is None else length
  if n < max(len(s) for s in seqs):
    raise ValueError(f'left_pad: length {n} is shorter than a prompt')
  tokens = np.full((len(seqs), n), pad_id, np.int32)
  mask = np.zeros((len(seqs), n), np.int32)
  for i, s in enumerate(seqs):
    tokens[i, n - len(s):] = s
    mask[i, n - len(s):] = 1
  return tokens, mask


def generate_ids(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]],
                 *, max_new_tokens: int, batch_size: int = 8,
                 stop_ids: Sequence[int] = (), pad_id: int = 0,
                 mesh=None) -> list[list[int]]:
  """Greedy continuations of token-id prompts, each cut at its first stop id.

  Every batch holds `batch_size` prompts (the last one filled with copies)
  left-padded to a power of two (at least 8, at most the longest prompt of
  the call rounded up to 8), so a few compiled programs serve them all, and
  is dispatched before any result is fetched: the host never waits between
  batches.
  """
  if not prompts:
    raise ValueError('generate_ids: no prompts')
  if mesh is not None:  # placed once, not once per batch
    params = jax.device_put(params, sharding.tree_shardings(
        mesh, forward.logical_axes(cfg), params))
  cap = -(-max(len(p) for p in prompts) // 8) * 8
  outs = []
  for b0 in range(0, len(prompts), batch_size):
    chunk = [list(p) for p in prompts[b0:b0 + batch_size]]
    ids = chunk + [chunk[-1]] * (batch_size - len(chunk))
    longest = max(len(p) for p in ids)
    length = min(cap, max(8, 1 << (longest - 1).bit_length()))
    tokens, mask = left_pad(ids, pad_id, length=length)
    outs.append((len(chunk), greedy_generate(
        params, cfg, tokens, mask, max_new_tokens=max_new_tokens,
        stop_ids=stop_ids, pad_id=pad_id, mesh=mesh)))
  stops = set(stop_ids)
  result = []
  for n, gen in outs:
    for row in sharding.to_host(gen)[:n].tolist():
      cut = next((i for i, t in enumerate(row) if t in stops), len(row))
      result.append(row[:cut])
  return result


def generate_text(params, cfg: ModelConfig, tokenizer: Any,
                  prompts: Sequence[str], *, max_new_tokens: int,
                  batch_size: int = 8, add_special_tokens: bool = True,
                  stop_ids: Sequence[int] | None = None,
                  mesh=None) -> list[str]:
  """Greedy completions of text prompts (decoded, without the prompt, up to
  the first stop id; default the tokenizer's EOS)."""
  if stop_ids is None:
    stop_ids = () if tokenizer.eos_token_id is None else (
        tokenizer.eos_token_id,)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  ids = [tokenizer(p, add_special_tokens=add_special_tokens)['input_ids']
         for p in prompts]
  gen = generate_ids(params, cfg, ids, max_new_tokens=max_new_tokens,
                     batch_size=batch_size, stop_ids=stop_ids, pad_id=pad,
                     mesh=mesh)
  return [tokenizer.decode(g, skip_special_tokens=True) for g in gen]
