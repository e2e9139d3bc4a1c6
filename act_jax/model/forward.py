"""Functional core: params as plain pytrees, a pure `apply`, stacked models.

Everything outside model.py talks to the decoder through these functions:
  abstract_params(cfg)       shapes/dtypes of the param tree, no allocation
  logical_axes(cfg)          logical axis names per param leaf
  init_params(cfg, rng)      random params (tests, toy training)
  apply(params, tokens, cfg) -> Output(logits, stats, cache)
  unstack_layers(params)     the same params with the layers unrolled
  stack_params([p1, p2..])   one tree with a `[M]` models axis (leading, or
                             second under `layers` when layer_major)
  apply_models(stacked, ...) one `jax.vmap`ped forward over all M models
  init_cache(cfg, B, S)      an empty KV cache for greedy decoding
Params are nested dicts keyed by HF-like names (`layers.self_attn.q_proj.
kernel [L, D, H*E]`, `embed_tokens.embedding [V, D]`, `norm.scale [D]`,
`lm_head.kernel [D, V]` unless embeddings are tied).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from act_jax.model import capture as capture_lib
from act_jax.model import hooks as hooks_lib
from act_jax.model.decoder import Decoder
from act_jax.model.config import ModelConfig

Params = dict[str, Any]


class Output(NamedTuple):
  """What a forward returns.

  logits: `[B, T, V]` float32 (or the final hidden `[B, T, D]` when
    `compute_logits=False`).
  stats: `{site: {stat: [L, C]}}` float32 plus `'count'` (masked tokens), or
    `{}` with capture off. Under `apply_models` every leaf gains `[M]` first.
  cache: the updated KV cache when one was given, else None.
  """
  logits: jax.Array
  stats: dict[str, Any]
  cache: dict[str, jax.Array] | None


def _dummy_ctx(batch: int, tokens: int) -> dict[str, jax.Array]:
  return make_ctx(jnp.ones((batch, tokens), jnp.int32))


def abstract_params(cfg: ModelConfig) -> Params:
  """ShapeDtypeStructs of the param tree (`eval_shape`: nothing allocated)."""
  boxed = _abstract_boxed(cfg)
  return nn.meta.unbox(boxed)


def logical_axes(cfg: ModelConfig) -> Params:
  """A tree like the params whose leaves are tuples of logical axis names."""
  boxed = _abstract_boxed(cfg)
  return jax.tree.map(lambda b: tuple(b.names), boxed,
                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


@functools.lru_cache(maxsize=32)
def _abstract_boxed(cfg: ModelConfig):
  model = Decoder(cfg)
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  variables = jax.eval_shape(
      lambda t: model.init(jax.random.key(0), t, _dummy_ctx(1, 1)), tokens)
  return variables['params']


def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
  """Random params (normal(0.02) kernels, unit norms, zero biases)."""
  model = Decoder(cfg)
  tokens = jnp.ones((1, 1), jnp.int32)
  return nn.meta.unbox(model.init(rng, tokens, _dummy_ctx(1, 1))['params'])


def make_ctx(attention_mask_bt: jax.Array,
             positions_bt: jax.Array | None = None,
             token_mask_bt: jax.Array | None = None,
             cache_index: jax.Array | int = 0,
             kv_valid_bs: jax.Array | None = None,
             segment_ids_bt: jax.Array | None = None) -> dict[str, jax.Array]:
  """The per-forward context every layer sees (broadcast through the scan).

  Args:
    attention_mask_bt: 1 for real tokens, 0 for padding (left or right).
    positions_bt: RoPE positions; default `cumsum(mask) - 1`, so padding on
      either side gives real tokens positions 0, 1, 2, ...
    token_mask_bt: which tokens statistics count; default the attention mask.
    cache_index: raw index of the first query token inside the KV cache.
    kv_valid_bs: which key slots may be attended (cache length S); default
      the attention mask (S == T).
    segment_ids_bt: document index of each token in packed rows; attention
      stays inside a document. Not used with a KV cache.
  """
  mask = attention_mask_bt.astype(jnp.int32)
  if positions_bt is None:
    positions_bt = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
  if token_mask_bt is None:
    token_mask_bt = mask
  if kv_valid_bs is None:
    kv_valid_bs = mask
  tokens = mask.shape[1]
  ctx = {
      'positions_bt': positions_bt.astype(jnp.int32),
      'token_mask_bt': token_mask_bt.astype(jnp.float32),
      'q_index_t': jnp.arange(tokens, dtype=jnp.int32) + cache_index,
      'kv_valid_bs': kv_valid_bs.astype(bool),
      'cache_index': jnp.asarray(cache_index, jnp.int32),
  }
  if segment_ids_bt is not None:
    if mask.shape != kv_valid_bs.shape:
      raise ValueError('segment_ids_bt cannot be combined with a KV cache')
    ctx['segment_ids_bt'] = segment_ids_bt.astype(jnp.int32)
  return ctx


def apply(params: Params,
          tokens_bt: jax.Array,
          cfg: ModelConfig,
          *,
          attention_mask_bt: jax.Array | None = None,
          positions_bt: jax.Array | None = None,
          token_mask_bt: jax.Array | None = None,
          capture: capture_lib.CaptureSpec | None = None,
          compute_logits: bool = True,
          cache: dict[str, jax.Array] | None = None,
          cache_index: jax.Array | int = 0,
          kv_valid_bs: jax.Array | None = None,
          segment_ids_bt: jax.Array | None = None,
          slices: Params | None = None,
          remat: str = 'none',
          hooks: dict[str, Any] | None = None) -> Output:
  """Pure forward of one model. See `make_ctx` for the mask arguments.

  `remat` ('none' | 'dots' | 'full', decoder.REMAT_POLICIES) trades a
  backward's activation memory for recomputation.

  With `capture`, statistics of the chosen sites are reduced in-graph over
  `token_mask_bt` (default: non-padding tokens) and returned in float32.
  `slices` (train.optim builds it) is a tree like the params' linear
  modules, `{'delta_cols'|'delta_rows': zeros [L, ...], 'idx_cols'|
  'idx_rows': [L, k]}`, through which only the selected kernel columns/rows
  get weight gradients (decoder.dot_slice_grads).
  `hooks` (`{kind: {site: [L, M, M, C]}}`, see hooks.py) patch or tap the
  sites' activations; they compare the vmapped models, so they need
  `apply_models`.
  """
  if attention_mask_bt is None:
    attention_mask_bt = jnp.ones(tokens_bt.shape, jnp.int32)
  ctx = make_ctx(attention_mask_bt, positions_bt, token_mask_bt, cache_index,
                 kv_valid_bs, segment_ids_bt)
  if hooks:
    hooks_lib.check_hooks(hooks)
  model = Decoder(cfg, capture, compute_logits,
                  scan_layers='layers' in params, remat=remat)
  variables = {'params': params}
  if slices:
    variables['slices'] = slices
  logits, stats, new_cache = model.apply(variables, tokens_bt, ctx, cache,
                                         hooks)
  if capture is not None:
    stats = dict(stats)
    stats['count'] = jnp.sum(ctx['token_mask_bt'])
  return Output(logits, stats, new_cache)


def _models_axes(tree: Params, layer_major: bool) -> dict[str, int]:
  """Per top-level key, the position of the models axis (a vmap in_axes
  prefix): 1 for the scanned `layers` leaves when layer_major, else 0."""
  return {k: int(layer_major and k == 'layers') for k in tree}


def unstack_layers(params: Params) -> Params:
  """The unrolled-layers tree: `layers` `[L, ...]` leaves split into
  `layers_0 .. layers_{L-1}` (one copy; `apply` accepts either tree)."""
  layers = params['layers']
  num = jax.tree.leaves(layers)[0].shape[0]
  out = {k: v for k, v in params.items() if k != 'layers'}
  for i in range(num):
    out[f'layers_{i}'] = jax.tree.map(lambda x, i=i: x[i], layers)
  return out


def stack_params(params_list: Sequence[Params],
                 layer_major: bool = False) -> Params:
  """Stacks related models' params on a new `[M]` models axis.

  Leading by default. With `layer_major`, the scanned layer leaves get it
  second (`[L, M, ...]`): the layer scan inside `apply_models` then slices
  all models' weights of one layer without the per-call transpose of every
  layer weight that vmapping a scan over `[M, L, ...]` costs (XLA copies
  them to `[L, M, ...]` on every call).

  Raises:
    ValueError naming the first leaf whose structure or shape differs.
  """
  if not params_list:
    raise ValueError('stack_params needs at least one model')
  first = params_list[0]
  ref = jax.tree_util.tree_structure(first)
  for i, p in enumerate(params_list[1:], start=1):
    if jax.tree_util.tree_structure(p) != ref:
      raise ValueError(f'model {i} has a different param tree than model 0')
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(first),
                            jax.tree_util.tree_leaves(p)):
      if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(
            f'model {i}: param {jax.tree_util.keystr(path)} is '
            f'{b.shape} {b.dtype}, model 0 has {a.shape} {a.dtype}')
  axes = _models_axes(first, layer_major)
  return {k: jax.tree.map(lambda *xs, a=axes[k]: jnp.stack(xs, axis=a),
                          *[p[k] for p in params_list]) for k in first}


def to_layer_major(stacked: Params) -> Params:
  """A leading-`[M]` stacked tree in the layer-major layout (one copy)."""
  return {k: (jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), v)
              if k == 'layers' else v) for k, v in stacked.items()}


def unstack_params(stacked: Params, index: int,
                   layer_major: bool = False) -> Params:
  """Model `index` of a stacked tree."""
  axes = _models_axes(stacked, layer_major)
  return {k: jax.tree.map(lambda x, a=axes[k]: jnp.take(x, index, axis=a), v)
          for k, v in stacked.items()}


def stacked_logical_axes(cfg: ModelConfig, layer_major: bool = False
                        ) -> Params:
  """`logical_axes(cfg)` with the stacked tree's `'models'` axis inserted."""
  def insert(names, at):
    return names[:at] + ('models',) + names[at:]
  tree = logical_axes(cfg)
  axes = _models_axes(tree, layer_major)
  return {k: jax.tree.map(lambda n, a=axes[k]: insert(n, a), v,
                          is_leaf=lambda n: isinstance(n, tuple))
          for k, v in tree.items()}


def apply_models(stacked: Params, tokens_bt: jax.Array, cfg: ModelConfig,
                 *, layer_major: bool = False, **kwargs) -> Output:
  """One `jax.vmap`ped forward of all M stacked models on the same tokens.

  The vmap axis is named `'models'`, so `CaptureSpec(pairwise=True)` can
  compare the models token by token. Every output leaf gets a leading `[M]`.
  `layer_major` says `stacked` is in that layout (see `stack_params`).
  """

  def one(p):
    return apply(p, tokens_bt, cfg, **kwargs)

  return jax.vmap(one, in_axes=(_models_axes(stacked, layer_major),),
                  axis_name=capture_lib.MODELS_AXIS)(stacked)


def init_cache(cfg: ModelConfig, batch: int,
               max_len: int) -> dict[str, jax.Array]:
  """An empty KV cache `{'k','v'}: [L, B, S, K, E]` in the compute dtype."""
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  dt = jnp.dtype(cfg.dtype)
  return {'k': jnp.zeros(shape, dt), 'v': jnp.zeros(shape, dt)}


def count_params(params: Params) -> int:
  """Total number of parameters."""
  return sum(int(x.size) for x in jax.tree.leaves(params))
