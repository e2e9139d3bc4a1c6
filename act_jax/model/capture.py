"""Which activation sites to record, and their in-graph per-channel reductions.

A *site* is a named activation inside a decoder layer. Output sites are the
outputs of the seven linear modules: channel `c` of a site is column `c` of
that module's kernel `[d_in, d_out]` (plus `bias[c]`), so statistics map 1:1
onto transferable parameters. Extra sites are analysis-only inputs: the two
normed residual streams, the attention output before `o_proj`, and the SwiGLU
hidden (the input of `down_proj`, one channel per MLP neuron).

Inside the jitted layer scan each site's activation `h_btc` is reduced over
the masked tokens to float32 `[C]` vectors (float32 elementwise work and
sums, no dot: so float32 on TPU and GPU too, whatever the global matmul
precision); activations never leave the device. With `pairwise=True` (the
forward must be vmapped over models with `axis_name='models'`), every model
also gets the token-aligned
`sum_t |h_i(t) - h_j(t)|` against every model j: `pair_abs_diff [M, C]`.

How the reductions run (benchmarks/README.md has the measurements): the
three sums are ONE variadic `lax.reduce` over the flattened `[N, C]` tokens,
so XLA reads the activation once for all of them; an einsum `'bt,btc->c'`
became a dot contracting two axes (batched over the models under vmap) that
XLA:CPU ran 3-6x slower than that pass. The pairwise sum is computed from
the models-batched activation `[M, N, C]` itself (`jax.custom_batching.
custom_vmap`), once per unordered pair i < j; an `all_gather` over the
vmapped axis broadcast it to `[M, M, N, C]` and did M^2 instead of
M(M-1)/2 differences. All arithmetic is float32 elementwise work and float32
sums (no dot), so the results carry full float32 precision on every backend,
the semantics `precision=HIGHEST` gives a dot.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

MODELS_AXIS = 'models'

OUTPUT_SITES = (
    'self_attn.q_proj',
    'self_attn.k_proj',
    'self_attn.v_proj',
    'self_attn.o_proj',
    'mlp.gate_proj',
    'mlp.up_proj',
    'mlp.down_proj',
)
EXTRA_SITES = (
    'input_layernorm',  # input of q/k/v
    'post_attention_layernorm',  # input of gate/up
    'self_attn.o_proj.in',  # attention output, input of o_proj
    'mlp.down_proj.in',  # SwiGLU hidden act(gate) * up, input of down_proj
)
ALL_SITES = OUTPUT_SITES + EXTRA_SITES
# Sites whose channels are kernel ROWS of a module (one MLP neuron, one
# attention-output channel); with the output sites, the transferable ones.
INPUT_SITES = ('self_attn.o_proj.in', 'mlp.down_proj.in')
TRANSFERABLE_SITES = OUTPUT_SITES + INPUT_SITES
STAT_NAMES = ('sum', 'sum_abs', 'sum_sq')


@dataclasses.dataclass(frozen=True)
class CaptureSpec:
  """What to record; static (hashable) so it can be a jit static argument."""

  sites: tuple[str, ...] = OUTPUT_SITES
  pairwise: bool = False  # needs vmap over models with axis_name='models'

  def __post_init__(self):
    object.__setattr__(self, 'sites', tuple(self.sites))
    unknown = [s for s in self.sites if s not in ALL_SITES]
    if unknown:
      raise ValueError(f'unknown capture sites {unknown}; known sites: '
                       f'{", ".join(ALL_SITES)}')
    if len(set(self.sites)) != len(self.sites):
      raise ValueError(f'duplicate capture sites in {self.sites}')


def site_channels(cfg, site: str) -> int:
  """Number of channels C of `site` for a ModelConfig `cfg`."""
  return {
      'self_attn.q_proj': cfg.q_dim,
      'self_attn.k_proj': cfg.kv_dim,
      'self_attn.v_proj': cfg.kv_dim,
      'self_attn.o_proj': cfg.hidden_size,
      'mlp.gate_proj': cfg.intermediate_size,
      'mlp.up_proj': cfg.intermediate_size,
      'mlp.down_proj': cfg.hidden_size,
      'input_layernorm': cfg.hidden_size,
      'post_attention_layernorm': cfg.hidden_size,
      'self_attn.o_proj.in': cfg.q_dim,
      'mlp.down_proj.in': cfg.intermediate_size,
  }[site]


def _sum_tokens(ops: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
  """Float32 sums over axis -2 (tokens) of same-shape arrays, one pass."""
  zero = jnp.zeros((), jnp.float32)
  return jax.lax.reduce(ops, (zero,) * len(ops),
                        lambda a, b: tuple(x + y for x, y in zip(a, b)),
                        (ops[0].ndim - 2,))


@jax.custom_batching.custom_vmap
def _pair_abs_diff(h_nc: jax.Array, m_n1: jax.Array) -> jax.Array:
  """`[M, C]` sums of `m |h_i - h_j|`; unbatched (one model) all zeros."""
  del m_n1
  return jnp.zeros((1, h_nc.shape[-1]), jnp.float32)


@_pair_abs_diff.def_vmap
def _pair_abs_diff_models(axis_size, in_batched, h_mnc, m_n1):
  """The models-batched rule: one masked |difference| sum per pair i < j.

  Row i of the result is model i's `[M, C]` value (symmetric, zero
  diagonal), returned batched over the models axis.
  """
  h_batched, m_batched = in_batched
  if not h_batched:  # every model saw the same activation
    zero = jnp.zeros((axis_size, axis_size, h_mnc.shape[-1]), jnp.float32)
    return zero, True
  mask = m_n1 if m_batched else jnp.broadcast_to(m_n1, (axis_size,) +
                                                 m_n1.shape)
  zero = jnp.zeros(h_mnc.shape[-1:], jnp.float32)
  rows = [[zero] * axis_size for _ in range(axis_size)]
  for i in range(axis_size):
    for j in range(i + 1, axis_size):
      d_c, = _sum_tokens((jnp.abs(h_mnc[i] - h_mnc[j]) * mask[i],))
      rows[i][j] = rows[j][i] = d_c
  return jnp.stack([jnp.stack(r) for r in rows]), True


def reduce_site(h_btc: jax.Array, mask_bt: jax.Array,
                pairwise: bool) -> dict[str, jax.Array]:
  """Float32 per-channel sums of one site's activation over masked tokens.

  Args:
    h_btc: the activation, any float dtype.
    mask_bt: 1.0 where a token counts, 0.0 for padding (or prompt) tokens.
    pairwise: also compute `pair_abs_diff [M, C]` across the vmapped models
      (needs `jax.vmap(..., axis_name='models')` around the forward, as
      `forward.apply_models` does, and no other vmap inside that one).

  Returns:
    {'sum', 'sum_abs', 'sum_sq'}: [C] float32; plus 'pair_abs_diff': [M, C].
  """
  c = h_btc.shape[-1]
  h = h_btc.reshape(-1, c).astype(jnp.float32)
  m = mask_bt.reshape(-1, 1).astype(jnp.float32)
  hm = h * m
  total, total_abs, total_sq = _sum_tokens((hm, jnp.abs(hm), hm * h))
  out = {'sum': total, 'sum_abs': total_abs, 'sum_sq': total_sq}
  if pairwise:
    jax.lax.axis_index(MODELS_AXIS)  # a clear error outside apply_models
    out['pair_abs_diff'] = _pair_abs_diff(h, m)
  return out

