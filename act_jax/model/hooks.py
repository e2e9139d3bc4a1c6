"""Site hooks: change a recorded activation, or tap its gradient, in-graph.

The decoder passes every capture site's activation `h_btc` through
`apply_site_hooks` (when the forward got `hooks`), inside the layer scan and
under the vmap over stacked models (axis name `capture.MODELS_AXIS`). Hooks
are per-layer arrays with a leading `[L]` axis (the scan slices it), keyed
by kind, then site; both kinds compare the M vmapped models token by token:

  'patch': {site: w [L, M, M, C] float32}
      activation patching: model i's channel c becomes
      `h_i + sum_j w[i, j, c] (h_j - h_i)`, so `w[t, s, c] = 1` replaces the
      target t's channel c by the source s's activation at the same token
      (the other models see their own, unpatched activations; a model with
      an all-zero row runs its plain forward).
  'taps': {site: zeros [L, M, M, C] float32}
      attribution taps: the identity on `h`, whose custom backward turns the
      cotangent `g_i = dL/dh_i` into `sum_t m(t) |(h_j - h_i)(t) g_i(t)|`
      for every model j, written into row i of the tap's gradient. So
      `grad(loss)(taps)[l, t, s, c]` is the attribution of channel c of the
      target t against source s, reduced over the counted tokens in float32
      without ever materializing `[B, T, C]` gradients outside the graph.

Only `model/decoder.py` calls this module; `act/attribution.py` and
`act/patching.py` build the hooks and read the results.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from act_jax.model import capture as capture_lib

KINDS = ('patch', 'taps')


@jax.custom_vjp
def _tap(h_btc, diff_mbtc, mask_bt, onehot_m, tap_mmc):
  del diff_mbtc, mask_bt, onehot_m, tap_mmc
  return h_btc


def _tap_fwd(h_btc, diff_mbtc, mask_bt, onehot_m, tap_mmc):
  del tap_mmc
  return h_btc, (diff_mbtc, mask_bt, onehot_m)


def _tap_bwd(res, g_btc):
  diff_mbtc, mask_bt, onehot_m = res
  g = g_btc.astype(jnp.float32)
  # sum_t m(t) |(h_j - h_i)(t) * g_i(t)| for every model j: [M, C].
  attr_mc = jnp.einsum('bt,mbtc->mc', mask_bt, jnp.abs(diff_mbtc * g[None]))
  # This model's row only: the vmapped models add into one shared tap.
  tap_mmc = onehot_m[:, None, None] * attr_mc[None]
  return (g_btc, jnp.zeros_like(diff_mbtc), jnp.zeros_like(mask_bt),
          jnp.zeros_like(onehot_m), tap_mmc)


_tap.defvjp(_tap_fwd, _tap_bwd)


def check_hooks(hooks: Mapping[str, Any]) -> None:
  """Raises ValueError naming an unknown hook kind or site."""
  for kind, per_site in hooks.items():
    if kind not in KINDS:
      raise ValueError(f'unknown hook kind {kind!r}; known: '
                       f'{", ".join(KINDS)}')
    unknown = [s for s in per_site if s not in capture_lib.ALL_SITES]
    if unknown:
      raise ValueError(f'hooks[{kind!r}]: unknown sites {unknown}; known '
                       f'sites: {", ".join(capture_lib.ALL_SITES)}')


def apply_site_hooks(site: str, h_btc: jax.Array, hooks: Mapping[str, Any],
                     mask_bt: jax.Array) -> jax.Array:
  """`h_btc` after this layer's hooks of `site` (see module docstring).

  Args:
    site: the capture site.
    h_btc: this model's activation at the site (compute dtype).
    hooks: this layer's hooks, `{kind: {site: [M, M, C]}}`.
    mask_bt: the tokens the taps count (float32).

  Must run under the vmap over models (`forward.apply_models`).
  """
  patch = hooks.get('patch', {}).get(site)
  taps = hooks.get('taps', {}).get(site)
  if patch is None and taps is None:
    return h_btc
  axis = capture_lib.MODELS_AXIS
  h32 = h_btc.astype(jnp.float32)
  h_mbtc = jax.lax.all_gather(h32, axis)
  me = jax.lax.axis_index(axis)
  if taps is not None:
    onehot_m = (jnp.arange(h_mbtc.shape[0]) == me).astype(jnp.float32)
    diff = jax.lax.stop_gradient(h_mbtc - h32[None])
    h_btc = _tap(h_btc, diff, mask_bt.astype(jnp.float32), onehot_m, taps)
  if patch is not None:
    w_mc = patch[me].astype(jnp.float32)
    # (1 - sum_j w_j) h_i + sum_j w_j h_j; the other models' activations
    # are constants here (no gradient flows across models).
    mixed = jnp.einsum('mc,mbtc->btc', w_mc, jax.lax.stop_gradient(h_mbtc))
    h_btc = (h_btc.astype(jnp.float32) * (1.0 - w_mc.sum(0)) +
             mixed).astype(h_btc.dtype)
  return h_btc
