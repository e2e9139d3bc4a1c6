"""The Llama-family decoder in Flax linen: Llama 2/3, Mistral, Qwen2/2.5, Qwen3.

Shape letters used across act-jax (in names such as `x_btd`, `stats_mlc`):
  B batch, T tokens (queries), S key positions, D embed, F mlp, H heads,
  K kv heads, G query heads per kv head (H / K), E head dim, V vocab,
  L layers, M models, C channels.

Design (see BUILD.md): linen because `Decoder.apply({'params': p}, ...)` is
already a pure function of a plain nested-dict pytree, which is what
localization, masks, transfer, optimizers and orbax all consume; stacking K
models and `jax.vmap` over them needs nothing more. Layers are `nn.scan`ned,
so every layer param carries a leading `[L]` axis and kernels stay 2-D and
HF-shaped transposed (`[d_in, d_out]`): output channel `c` of an HF weight
`W[c, :]` is exactly `kernel[..., c]`. Param names follow HF.

Captured statistics (see capture.py) are scan outputs of each layer, reduced
in-graph to float32 `[L, C]` arrays. With capture off the forward is the
plain forward. Site hooks (hooks.py: activation patching, attribution taps)
act on the same recorded activations when a forward is given `hooks`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from act_jax.model import capture as capture_lib
from act_jax.model import hooks as hooks_lib
from act_jax.model import sharding
from act_jax.model.config import ModelConfig

_NEG_INF = -1e30  # finite, so a fully masked (padding) query stays NaN-free
# Decoder(remat=...): none keeps all activations for the backward; dots
# keeps the outputs of the 2-D (weight) matmuls and recomputes attention
# and elementwise ops; full recomputes the whole layer.
REMAT_POLICIES = {
    'none': None,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'full': None,
}


def _dtype(name: str) -> jnp.dtype:
  return jnp.dtype(name)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
  """Inverse RoPE frequencies `[E/2]`, with linear or llama3 scaling."""
  dim = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta**(jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  if cfg.rope_type == 'linear':
    return inv / cfg.rope_factor
  if cfg.rope_type == 'llama3':
    factor = cfg.rope_factor
    old = cfg.rope_original_max_positions
    low_wavelen = old / cfg.rope_low_freq_factor
    high_wavelen = old / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)
  return inv


def apply_rope(x_bthe: jax.Array, positions_bt: jax.Array,
               inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding, HF `rotate_half` (non-interleaved) convention."""
  freqs_bte = positions_bt[..., None].astype(jnp.float32) * inv_freq
  emb = jnp.concatenate([freqs_bte, freqs_bte], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  x = x_bthe.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x * cos + rotated * sin).astype(x_bthe.dtype)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis, statistics in float32 (as HF)."""

  eps: float
  dtype: Any
  param_dtype: Any
  axis_name: str = 'norm'

  @nn.compact
  def __call__(self, x):
    scale = self.param(
        'scale', nn.with_logical_partitioning(nn.initializers.ones,
                                              (self.axis_name,)),
        (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
    return (y.astype(self.dtype) * scale.astype(self.dtype)).astype(self.dtype)


def _dot(x_nd, kernel):
  return jnp.dot(x_nd, kernel, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def dot_slice_grads(x_nd: jax.Array, kernel: jax.Array, delta: jax.Array,
                    idx: jax.Array, rows: bool) -> jax.Array:
  """`x @ kernel` whose VJP gives weight gradients of selected slices only.

  `delta` is a zero probe shaped like the selected slices (`[d_in, k]`
  columns `idx`, or `[k, d_out]` rows `idx` when `rows`): its cotangent is
  exactly the gradient of those kernel columns (rows), computed as a
  `k`-wide product; `kernel` gets no gradient (the caller stops it). So a
  fine-tune of a few channels skips the full weight gradient `x^T dy`. The
  value ignores `delta` (it must be zeros); `dx` is the full `dy kernel^T`.
  """
  del delta, idx, rows
  return _dot(x_nd, kernel)


def _dot_slice_grads_fwd(x_nd, kernel, delta, idx, rows):
  del rows
  # An empty array carries delta's dtype (residuals must be arrays).
  return _dot(x_nd, kernel), (x_nd, kernel, idx, jnp.zeros((0,), delta.dtype))


def _dot_slice_grads_bwd(rows, res, g_nc):
  x_nd, kernel, idx, dtype_of = res
  # The transposes of the same dot the dense path differentiates, so the
  # selected slices get the dense gradient's values (up to summation order).
  dx, = jax.linear_transpose(lambda x: _dot(x, kernel), x_nd)(g_nc)
  if rows:
    x_sel = jnp.take(x_nd, idx, axis=1)
    w_sel = jax.ShapeDtypeStruct((idx.shape[0], kernel.shape[1]),
                                 kernel.dtype)
    dw, = jax.linear_transpose(lambda w: _dot(x_sel, w), w_sel)(g_nc)
  else:
    w_sel = jax.ShapeDtypeStruct((kernel.shape[0], idx.shape[0]),
                                 kernel.dtype)
    dw, = jax.linear_transpose(lambda w: _dot(x_nd, w), w_sel)(
        jnp.take(g_nc, idx, axis=1))
  return dx, None, dw.astype(dtype_of.dtype), None


dot_slice_grads.defvjp(_dot_slice_grads_fwd, _dot_slice_grads_bwd)


class Linear(nn.Module):
  """`y = x @ kernel (+ bias)`, kernel `[d_in, d_out]`, float32 accumulation.

  With a `slices` variable `delta_cols`/`delta_rows` (+ `idx_cols`/
  `idx_rows`) for this module, the kernel's weight gradient is computed only
  for those columns/rows (`dot_slice_grads`).
  """

  features: int
  use_bias: bool
  axes: tuple[str, str]  # logical names of (d_in, d_out)
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    kernel = self.param(
        'kernel',
        nn.with_logical_partitioning(nn.initializers.normal(0.02), self.axes),
        (x.shape[-1], self.features), self.param_dtype)
    kernel = sharding.constrain_weight(kernel, self.axes)
    # A 2-D dot: XLA's CPU backward of a dot contracting over two flattened
    # batch axes was ~1.7x slower than over one (benchmarks/README).
    x_nd = x.reshape(-1, x.shape[-1]).astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    for kind in ('cols', 'rows'):
      if self.has_variable('slices', f'delta_{kind}'):
        y = dot_slice_grads(x_nd, kernel,
                            self.get_variable('slices', f'delta_{kind}'),
                            self.get_variable('slices', f'idx_{kind}'),
                            kind == 'rows')
        break
    else:
      y = _dot(x_nd, kernel)
    y = y.reshape(x.shape[:-1] + (self.features,))
    if self.use_bias:
      bias = self.param(
          'bias',
          nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
          (self.features,), self.param_dtype)
      y = y + bias.astype(jnp.float32)
    return y.astype(self.dtype)


class Embed(nn.Module):
  """Token embedding `[V, D]`; `attend` gives tied-embedding logits."""

  cfg: ModelConfig

  def setup(self):
    self.embedding = self.param(
        'embedding',
        nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                     ('vocab', 'embed')),
        (self.cfg.vocab_size, self.cfg.hidden_size),
        _dtype(self.cfg.param_dtype))

  def __call__(self, tokens_bt):
    return jnp.take(self.embedding, tokens_bt, axis=0).astype(
        _dtype(self.cfg.dtype))

  def attend(self, x_btd):
    dt = _dtype(self.cfg.dtype)
    emb = sharding.constrain_weight(self.embedding, ('vocab', 'embed'))
    return jnp.einsum('btd,vd->btv', x_btd, emb.astype(dt),
                      preferred_element_type=jnp.float32)


def attention_mask(ctx: dict[str, jax.Array]) -> jax.Array:
  """`[B, T, S]` bool: which key slot each query may attend (no window).

  Causal on raw (cache) indices as HF, key slots limited to `kv_valid_bs`
  and, for packed rows, to the query's own document. Built once per forward
  and broadcast to every layer, so segment ids cost one compare per
  forward, not one per layer.
  """
  q_idx_t = ctx['q_index_t']
  k_idx_s = jnp.arange(ctx['kv_valid_bs'].shape[1])
  allowed_bts = ((k_idx_s[None, :] <= q_idx_t[:, None])[None] &
                 ctx['kv_valid_bs'][:, None, :])
  if 'segment_ids_bt' in ctx:  # packed rows: no attention across documents
    seg_bt = ctx['segment_ids_bt']
    allowed_bts &= seg_bt[:, :, None] == seg_bt[:, None, :]
  return allowed_bts


class Attention(nn.Module):
  """GQA self-attention with RoPE, optional q/k norm, window and KV cache.

  Returns `(o_btd, new_cache)`; `record(site, h)` receives captured sites
  and returns the activation to use (changed only by site hooks).
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, h_btd, ctx, per_layer, record):
    cfg = self.cfg
    dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    batch, tokens = h_btd.shape[:2]

    def linear(name, feats, use_bias, axes, x):
      return Linear(feats, use_bias, axes, dt, pdt, name=name)(x)

    q = linear('q_proj', cfg.q_dim, cfg.qkv_bias, ('embed', 'heads'), h_btd)
    k = linear('k_proj', cfg.kv_dim, cfg.qkv_bias, ('embed', 'kv_heads'), h_btd)
    v = linear('v_proj', cfg.kv_dim, cfg.qkv_bias, ('embed', 'kv_heads'), h_btd)
    q = record('self_attn.q_proj', q)
    k = record('self_attn.k_proj', k)
    v = record('self_attn.v_proj', v)
    q_bthe = q.reshape(batch, tokens, cfg.num_heads, cfg.head_dim)
    k_bske = k.reshape(batch, tokens, cfg.num_kv_heads, cfg.head_dim)
    v_bske = v.reshape(batch, tokens, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
      q_bthe = RMSNorm(cfg.rms_norm_eps, dt, pdt, 'head_dim',
                       name='q_norm')(q_bthe)
      k_bske = RMSNorm(cfg.rms_norm_eps, dt, pdt, 'head_dim',
                       name='k_norm')(k_bske)
    inv_freq = rope_inv_freq(cfg)
    q_bthe = apply_rope(q_bthe, ctx['positions_bt'], inv_freq)
    k_bske = apply_rope(k_bske, ctx['positions_bt'], inv_freq)

    new_cache = {}
    if 'cache_k' in per_layer:  # decode: write this step's keys into the cache
      start = (0, ctx['cache_index'], 0, 0)
      k_bske = jax.lax.dynamic_update_slice(per_layer['cache_k'],
                                            k_bske.astype(dt), start)
      v_bske = jax.lax.dynamic_update_slice(per_layer['cache_v'],
                                            v_bske.astype(dt), start)
      new_cache = {'cache_k': k_bske, 'cache_v': v_bske}

    # The causal / padding / document mask is built once per forward
    # (attention_mask); only a sliding window, which differs per layer, is
    # applied here, and only in models that have one.
    allowed_bts = ctx['allowed_bts']
    if any(w > 0 for w in cfg.sliding_windows):
      q_idx_t = ctx['q_index_t']
      k_idx_s = jnp.arange(k_bske.shape[1])
      window = per_layer['window']
      allowed_bts &= ((window <= 0) |
                      (k_idx_s[None, :] > q_idx_t[:, None] - window))[None]

    groups = cfg.num_heads // cfg.num_kv_heads
    q_btkge = q_bthe.reshape(batch, tokens, cfg.num_kv_heads, groups,
                             cfg.head_dim)
    scores = jnp.einsum('btkge,bske->bkgts', q_btkge, k_bske,
                        preferred_element_type=jnp.float32)
    scores = scores * cfg.head_dim**-0.5
    scores = jnp.where(allowed_bts[:, None, None], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    o = jnp.einsum('bkgts,bske->btkge', probs, v_bske,
                   preferred_element_type=jnp.float32).astype(dt)
    o = o.reshape(batch, tokens, cfg.q_dim)
    o = record('self_attn.o_proj.in', o)
    o = linear('o_proj', cfg.hidden_size, cfg.o_bias, ('heads', 'embed'), o)
    o = record('self_attn.o_proj', o)
    return o, new_cache


class Mlp(nn.Module):
  """SwiGLU MLP: `down(silu(gate(h)) * up(h))`."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, h_btd, record):
    cfg = self.cfg
    dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    feats = cfg.intermediate_size
    gate = Linear(feats, cfg.mlp_bias, ('embed', 'mlp'), dt, pdt,
                  name='gate_proj')(h_btd)
    up = Linear(feats, cfg.mlp_bias, ('embed', 'mlp'), dt, pdt,
                name='up_proj')(h_btd)
    gate = record('mlp.gate_proj', gate)
    up = record('mlp.up_proj', up)
    hidden_btf = (jax.nn.silu(gate.astype(jnp.float32)) *
                  up.astype(jnp.float32)).astype(dt)
    hidden_btf = record('mlp.down_proj.in', hidden_btf)
    down = Linear(cfg.hidden_size, cfg.mlp_bias, ('mlp', 'embed'), dt, pdt,
                  name='down_proj')(hidden_btf)
    return record('mlp.down_proj', down)


class DecoderLayer(nn.Module):
  """One pre-norm block: attention + SwiGLU MLP, each with a residual.

  Called under `nn.scan` as `(x_btd, ctx, per_layer) -> (x_btd, ys)`: `ctx`
  is broadcast to every layer (positions, masks), `per_layer` holds this
  layer's window size and KV-cache slice, `ys` its statistics and new cache.
  """

  cfg: ModelConfig
  capture: capture_lib.CaptureSpec | None = None

  @nn.compact
  def __call__(self, x_btd, ctx, per_layer):
    cfg = self.cfg
    dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    stats = {}

    def record(site, h):
      if self.capture is not None and site in self.capture.sites:
        stats[site] = capture_lib.reduce_site(h, ctx['token_mask_bt'],
                                              self.capture.pairwise)
      if 'hooks' in per_layer:  # patching / attribution taps (hooks.py)
        h = hooks_lib.apply_site_hooks(site, h, per_layer['hooks'],
                                       ctx['token_mask_bt'])
      return h

    h = RMSNorm(cfg.rms_norm_eps, dt, pdt, name='input_layernorm')(x_btd)
    h = record('input_layernorm', h)
    o, new_cache = Attention(cfg, name='self_attn')(h, ctx, per_layer, record)
    x_btd = x_btd + o
    h = RMSNorm(cfg.rms_norm_eps, dt, pdt,
                name='post_attention_layernorm')(x_btd)
    h = record('post_attention_layernorm', h)
    x_btd = x_btd + Mlp(cfg, name='mlp')(h, record)
    x_btd = sharding.constrain_activation(x_btd, ('batch', 'length', 'embed'))
    return x_btd, {'stats': stats, **new_cache}


class Decoder(nn.Module):
  """Embedding, scanned decoder layers, final norm and (optional) lm_head.

  `__call__` returns `(logits_btv or hidden_btd, stats, cache)`; see
  forward.apply for the public, pure entry point. With `scan_layers=False`
  the layers are unrolled, each with its own params `layers_0`, `layers_1`,
  ... (forward.unstack_layers): a loop that runs the model many times on
  the same weights (greedy decoding) slices them once instead of copying
  every layer's weights out of the stacked arrays on every step, which is
  what XLA:CPU does for a scan (and for static slices too).
  """

  cfg: ModelConfig
  capture: capture_lib.CaptureSpec | None = None
  compute_logits: bool = True
  scan_layers: bool = True
  remat: str = 'none'  # what a backward keeps per layer (REMAT_POLICIES)

  @nn.compact
  def __call__(self, tokens_bt, ctx, cache=None, hooks=None):
    cfg = self.cfg
    dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    embed = Embed(cfg, name='embed_tokens')
    x_btd = embed(tokens_bt)
    x_btd = sharding.constrain_activation(x_btd, ('batch', 'length', 'embed'))

    ctx = dict(ctx, allowed_bts=attention_mask(ctx))
    per_layer = {'window': jnp.asarray(cfg.sliding_windows, jnp.int32)}
    if cache is not None:
      per_layer['cache_k'], per_layer['cache_v'] = cache['k'], cache['v']
    if hooks:  # [L, ...] per kind and site: the scan gives each layer its own
      per_layer['hooks'] = hooks
    layer = DecoderLayer
    if self.remat != 'none':
      # Recompute inside the backward instead of keeping every layer's
      # activations: 'dots' keeps only the matmul outputs, 'full' only the
      # layer input. Forward-only programs are unchanged.
      layer = nn.remat(layer, prevent_cse=False,
                       policy=REMAT_POLICIES[self.remat])
    if self.scan_layers:
      layers = nn.scan(
          layer,
          variable_axes={'params': 0, 'slices': 0},
          split_rngs={'params': True},
          in_axes=(nn.broadcast, 0),
          length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: 'layers'},
      )(cfg, self.capture, name='layers')
      x_btd, ys = layers(x_btd, ctx, per_layer)
    else:
      outs = []
      for i in range(cfg.num_layers):
        x_btd, y = layer(cfg, self.capture, name=f'layers_{i}')(
            x_btd, ctx, jax.tree.map(lambda a, i=i: a[i], per_layer))
        outs.append(y)
      ys = jax.tree.map(lambda *a: jnp.stack(a), *outs)
    new_cache = None
    if cache is not None:
      new_cache = {'k': ys['cache_k'], 'v': ys['cache_v']}

    x_btd = RMSNorm(cfg.rms_norm_eps, dt, pdt, name='norm')(x_btd)
    if not self.compute_logits:
      return x_btd, ys['stats'], new_cache
    if cfg.tie_word_embeddings:
      logits = embed.attend(x_btd)
    else:
      logits = Linear(cfg.vocab_size, False, ('embed', 'vocab'), dt, pdt,
                      name='lm_head')(x_btd).astype(jnp.float32)
    return logits, ys['stats'], new_cache
