"""Which activation sites to record, and their in-graph per-channel reductions.

A *site* is a named activation inside a decoder layer. Output sites are the
outputs of the seven linear modules: channel `c` of a site is column `c` of
that module's kernel `[d_in, d_out]` (plus `bias[c]`), so statistics map 1:1
onto transferable parameters. Extra sites are analysis-only inputs: the two
normed residual streams, the attention output before `o_proj`, and the SwiGLU
hidden (the input of `down_proj`, one channel per MLP neuron).

Inside the jitted layer scan each site's activation `h_btc` is reduced over
the masked tokens to float32 `[C]` vectors (dots at `Precision.HIGHEST`,
so float32 on TPU and GPU too, whatever the global matmul precision);
activations never leave the device. With `pairwise=True` (the forward must be vmapped over models with
`axis_name='models'`), every model also gets the token-aligned
`sum_t |h_i(t) - h_j(t)|` against every model j: `pair_abs_diff [M, C]`.
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


def reduce_site(h_btc: jax.Array, mask_bt: jax.Array,
                pairwise: bool) -> dict[str, jax.Array]:
  """Float32 per-channel sums of one site's activation over masked tokens.

  Args:
    h_btc: the activation, any float dtype.
    mask_bt: 1.0 where a token counts, 0.0 for padding (or prompt) tokens.
    pairwise: also compute `pair_abs_diff [M, C]` across the vmapped models.

  Returns:
    {'sum', 'sum_abs', 'sum_sq'}: [C] float32; plus 'pair_abs_diff': [M, C].
  """
  h = h_btc.astype(jnp.float32)
  m = mask_bt.astype(jnp.float32)
  out = {
      'sum': _masked_sum('bt,btc->c', m, h),
      'sum_abs': _masked_sum('bt,btc->c', m, jnp.abs(h)),
      'sum_sq': _masked_sum('bt,btc->c', m, h * h),
  }
  if pairwise:
    h_mbtc = jax.lax.all_gather(h, MODELS_AXIS)
    out['pair_abs_diff'] = _masked_sum('bt,mbtc->mc', m,
                                       jnp.abs(h_mbtc - h[None]))
  return out


def _masked_sum(spec: str, m, h):
  """A token-masked sum as a dot, in full float32 on every backend.

  The default matmul precision of a float32 dot is bf16 passes on TPU and
  TF32 on recent GPUs; statistics must not depend on a global flag, so the
  precision is asked for here.
  """
  return jnp.einsum(spec, m, h, precision=jax.lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32)
