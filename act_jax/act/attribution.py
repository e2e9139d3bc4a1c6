"""Attribution statistics: the activation difference weighed by its effect.

For a (source s, target t) pair and a channel c of a site, the attribution
score is

  s_c = E_t | (h_s - h_t)_c(tok) * dL_t / dh_t,c(tok) |

at the target: the first-order change of the target's ability loss when
channel c at token `tok` takes the source's value, in absolute value,
averaged over the counted probe tokens. `L_t` is the target's summed
next-token NLL on the probe batch (targets weighted by the batch's
`token_mask_bt`, so `collect.count_tokens=response` makes it the response's
loss); a sum, not a mean, so a token's gradient does not depend on the
batch size.

`attribution_stats` computes it for every ordered pair of the M stacked
models in the same vmapped, sharded forward that reduces the other
statistics, plus one backward: the decoder's attribution taps
(`model/hooks.py`) are zero `[L, M, M, C]` inputs whose gradient IS the
float32 per-channel sum `sum_tok m(tok) |(h_j - h_i) g_i|`, reduced inside
the backward, so no `[B, T, C]` gradient leaves the graph. Statistics layout
(as `pair_abs_diff`): `pair_attribution [M, L, M, C]`, entry `[t, l, s, c]`;
the artifact stores it `[M, M, L, C]` (`io.stats`), and the score is
`act.localize` 'attribution' = `pair_attribution[t, s] / count[t]`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from act_jax.model import capture as capture_lib
from act_jax.model import forward
from act_jax.model import losses
from act_jax.model.config import ModelConfig

STAT = 'pair_attribution'


def zero_taps(cfg: ModelConfig, sites, num_models: int) -> dict[str, Any]:
  """`{'taps': {site: zeros [L, M, M, C] float32}}`: the hooks to grad."""
  return {'taps': {s: jnp.zeros((cfg.num_layers, num_models, num_models,
                                 capture_lib.site_channels(cfg, s)),
                                jnp.float32) for s in sites}}


def attribution_stats(stacked, batch: dict[str, jax.Array], cfg: ModelConfig,
                      spec: capture_lib.CaptureSpec,
                      layer_major: bool = False) -> dict[str, Any]:
  """The capture statistics of `spec` plus `pair_attribution` per site.

  Args:
    stacked: M models' params stacked by `forward.stack_params` (M >= 2);
      `layer_major` as there.
    batch: `tokens_bt`, `attention_mask_bt`, `token_mask_bt`,
      `positions_bt`, `segment_ids_bt` (data.py's probe batches).
    cfg: the models' ModelConfig.
    spec: capture sites (pairwise statistics included when set).

  Returns:
    `forward.apply_models`' stats (`{site: {stat: [M, L, C]}}`, `count`
    `[M]`) with `stats[site]['pair_attribution']` `[M, L, M, C]` float32.
  """
  num_models = stacked['embed_tokens']['embedding'].shape[0]
  loss_batch = losses.as_loss_batch(batch)
  weights_bt = losses.target_weights(loss_batch)

  def loss(hooks):
    out = forward.apply_models(
        stacked, batch['tokens_bt'], cfg, layer_major=layer_major,
        attention_mask_bt=batch['attention_mask_bt'],
        positions_bt=batch['positions_bt'],
        token_mask_bt=batch['token_mask_bt'],
        segment_ids_bt=batch['segment_ids_bt'], capture=spec, hooks=hooks)
    lp_mbt = jax.vmap(losses.token_logprobs, in_axes=(0, None))(
        out.logits, batch['tokens_bt'])
    # Each model's own summed NLL; the models do not interact, so the
    # gradient at model i's activations is dL_i / dh_i.
    return -jnp.sum(lp_mbt * weights_bt[None]), out.stats

  grads, stats = jax.grad(loss, has_aux=True)(
      zero_taps(cfg, spec.sites, num_models))
  stats = {k: dict(v) if k != 'count' else v for k, v in stats.items()}
  for site, g_lmmc in grads['taps'].items():
    stats[site][STAT] = jnp.transpose(g_lmmc, (1, 0, 2, 3))
  return stats
