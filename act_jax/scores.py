"""Per-channel scores for one (source, target) model pair.

Inputs are the collected statistics in the stats artifact layout: per site
`{'sum', 'sum_abs', 'sum_sq': [M, L, C], 'pair_abs_diff': [M, M, L, C]}`
float32 sums over the probe tokens, plus `count: [M]` (tokens per model).
A score is a float32 `[L, C]` array per site; higher means "this channel
differs more between the two models".

Scores (ACT_METHOD.md step 3):
  mean_abs_diff        mean_t |h_src(t) - h_tgt(t)|  (default; token-aligned)
  diff_of_mean_abs     |mean_t |h_src| - mean_t |h_tgt||
  *_norm               either, divided by the site's mean score over all its
                       layers and channels (makes sites comparable for a
                       global selection)
  weight_diff          ||W_src[:, c] - W_tgt[:, c]||_2 over the kernel column
                       plus the bias entry (needs params; output sites, and
                       the '.in' sites as kernel rows)
  random               uniform [0, 1), seeded per (seed, site)
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

SCORES = ('mean_abs_diff', 'diff_of_mean_abs', 'mean_abs_diff_norm',
          'diff_of_mean_abs_norm', 'weight_diff', 'random')
DEFAULT_SCORE = 'mean_abs_diff'

Stats = Mapping[str, Mapping[str, Any]]


class ScoreError(ValueError):
  """Bad score request (unknown score, site, model index, missing stat)."""


def _check_sites(stats: Stats, sites: Sequence[str] | None) -> list[str]:
  known = [s for s in stats if s != 'count']
  if sites is None:
    return known
  unknown = [s for s in sites if s not in known]
  if unknown:
    raise ScoreError(f'unknown site(s) {unknown}; known sites: '
                     f'{", ".join(known)}')
  return list(sites)


def _check_pair(count: np.ndarray, src: int, tgt: int) -> None:
  m = count.shape[0]
  for name, i in (('source', src), ('target', tgt)):
    if not 0 <= i < m:
      raise ScoreError(f'{name} model index {i} out of range [0, {m})')
  if src == tgt:
    raise ScoreError(f'source and target are the same model ({src})')
  if np.any(count[[src, tgt]] <= 0):
    raise ScoreError(f'no tokens counted for models {src}/{tgt}: '
                     f'count={count.tolist()}')


def activation_scores(stats: Stats, count, src: int, tgt: int,
                      score: str = DEFAULT_SCORE,
                      sites: Sequence[str] | None = None
                      ) -> dict[str, np.ndarray]:
  """Activation-based scores `{site: [L, C] float32}` for `src` vs `tgt`.

  Args:
    stats: `{site: {stat: array}}` in the stats artifact layout.
    count: `[M]` tokens counted per model.
    src, tgt: model indices.
    score: one of the activation scores in `SCORES`.
    sites: subset of sites (default: all in `stats`).
  """
  base = score[:-len('_norm')] if score.endswith('_norm') else score
  if base not in ('mean_abs_diff', 'diff_of_mean_abs'):
    raise ScoreError(f'{score!r} is not an activation score; activation '
                     'scores: mean_abs_diff, diff_of_mean_abs (+ _norm)')
  count = np.asarray(count, np.float64).reshape(-1)
  _check_pair(count, src, tgt)
  out = {}
  for site in _check_sites(stats, sites):
    st = stats[site]
    if base == 'mean_abs_diff':
      if 'pair_abs_diff' not in st:
        raise ScoreError(f'site {site}: stats lack pair_abs_diff (collect '
                         'with pairwise=True or use --score=diff_of_mean_abs)')
      # Token-aligned: the same tokens go through every model, so the
      # source's count is the pair's count.
      s = np.asarray(st['pair_abs_diff'][src, tgt], np.float64) / count[src]
    else:
      a = np.asarray(st['sum_abs'][src], np.float64) / count[src]
      b = np.asarray(st['sum_abs'][tgt], np.float64) / count[tgt]
      s = np.abs(a - b)
    if score.endswith('_norm'):
      mean = s.mean()
      s = s / mean if mean > 0 else s
    out[site] = s.astype(np.float32)
  return out


def _site_module(site: str) -> tuple[str, str]:
  """(module path under layers, 'out'|'in') of a transferable site."""
  if site.endswith('.in'):
    return site[:-len('.in')], 'in'
  return site, 'out'


def _module(params: Mapping[str, Any], module: str):
  node = params['layers']
  for p in module.split('.'):
    if p not in node:
      raise ScoreError(f'params have no module layers.{module}')
    node = node[p]
  return node


def weight_scores(params_src, params_tgt,
                  sites: Sequence[str]) -> dict[str, np.ndarray]:
  """`weight_diff` scores: L2 norm of the param difference per channel.

  An output site's channel c is kernel column `[l, :, c]` plus `bias[l, c]`;
  an input site ('mlp.down_proj.in', 'self_attn.o_proj.in') is the kernel
  row `[l, c, :]`. Computed on device; only `[L, C]` comes back.
  """
  out = {}
  for site in sites:
    module, side = _site_module(site)
    if module.endswith('layernorm') or module not in _TRANSFERABLE_MODULES:
      raise ScoreError(f'weight_diff is undefined for site {site}; '
                       f'sites with weights: {", ".join(WEIGHT_SITES)}')
    a, b = _module(params_src, module), _module(params_tgt, module)
    d = (jnp.asarray(a['kernel'], jnp.float32) -
         jnp.asarray(b['kernel'], jnp.float32))
    sq = jnp.sum(d * d, axis=1 if side == 'out' else 2)
    if side == 'out' and 'bias' in a:
      db = (jnp.asarray(a['bias'], jnp.float32) -
            jnp.asarray(b['bias'], jnp.float32))
      sq = sq + db * db
    out[site] = np.asarray(jnp.sqrt(sq), np.float32)
  return out


_TRANSFERABLE_MODULES = ('self_attn.q_proj', 'self_attn.k_proj',
                         'self_attn.v_proj', 'self_attn.o_proj',
                         'mlp.gate_proj', 'mlp.up_proj', 'mlp.down_proj')
WEIGHT_SITES = _TRANSFERABLE_MODULES + ('self_attn.o_proj.in',
                                        'mlp.down_proj.in')


def random_scores(shapes: Mapping[str, tuple[int, int]],
                  seed: int = 0) -> dict[str, np.ndarray]:
  """Uniform [0, 1) scores; each site's stream depends only on (seed, site)."""
  out = {}
  for site, shape in shapes.items():
    digest = hashlib.sha256(f'{seed}:{site}'.encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], 'little'))
    out[site] = rng.random(shape, dtype=np.float32)
  return out


def channel_scores(stats: Stats, count, src: int, tgt: int,
                   score: str = DEFAULT_SCORE, *,
                   sites: Sequence[str] | None = None,
                   params_src=None, params_tgt=None,
                   seed: int = 0) -> dict[str, np.ndarray]:
  """Scores `{site: [L, C] float32}` of any kind in `SCORES`.

  `weight_diff` needs `params_src`/`params_tgt` (stats only fix the sites
  and shapes); `random` needs only shapes (taken from `stats`).
  """
  if score not in SCORES:
    raise ScoreError(f'unknown score {score!r}; known: {", ".join(SCORES)}')
  sites = _check_sites(stats, sites)
  if score == 'weight_diff':
    if params_src is None or params_tgt is None:
      raise ScoreError('--score=weight_diff needs the source and target '
                       'params (checkpoints)')
    return weight_scores(params_src, params_tgt, sites)
  if score == 'random':
    shapes = {s: tuple(np.shape(stats[s]['sum'])[-2:]) for s in sites}
    return random_scores(shapes, seed)
  return activation_scores(stats, count, src, tgt, score, sites)
