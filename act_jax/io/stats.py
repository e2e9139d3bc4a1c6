"""The statistics artifact: one directory per collection run.

Layout:
  stats.safetensors  float32 `<site>/sum`, `<site>/sum_abs`, `<site>/sum_sq`
                     `[M, L, C]`; `<site>/pair_abs_diff` `[M, M, L, C]` when
                     M >= 2 (entry [i, j] = sum_t |h_i(t) - h_j(t)|);
                     `<site>/pair_attribution` `[M, M, L, C]` when the
                     manifest says `attribution` (entry [t, s] = sum_t
                     |(h_s - h_t) dL_t/dh_t|, act/attribution.py);
                     int64 `count [M]` (tokens counted per model)
  manifest.json      models (paths), model_config, probe (path, fields,
                     template, ...), token/truncation counts, sites with
                     their channel counts, dtype, shapes, capture options,
                     act-jax version
Written to a temporary sibling and renamed, so a directory either is
complete or does not exist. Scores derived from statistics have one format
too: a safetensors file of float32 `[L, C]` arrays keyed `<site>` or
`<part>/<site>` (`save_scores` / `load_scores`). `load_stats` validates arrays against the
manifest and returns `Stats` with mean / mean_abs / var / pair helpers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import numpy as np
from safetensors.numpy import load_file, save_file

from act_jax.io import atomic
from act_jax.model import capture

ARRAYS_FILE = 'stats.safetensors'
MANIFEST_FILE = 'manifest.json'
FORMAT = 'act-jax-stats'
FORMAT_VERSION = 1
PER_MODEL_STATS = ('sum', 'sum_abs', 'sum_sq')


class StatsError(ValueError):
  """A statistics directory that is missing pieces or inconsistent."""


@dataclasses.dataclass
class Stats:
  """Loaded statistics: `arrays[site][stat]` plus `count [M]`."""

  manifest: dict[str, Any]
  arrays: dict[str, dict[str, np.ndarray]]
  count: np.ndarray  # [M] int64

  @property
  def sites(self) -> tuple[str, ...]:
    return tuple(self.manifest['sites'])

  @property
  def model_paths(self) -> list[str]:
    return [m['path'] for m in self.manifest['models']]

  @property
  def num_models(self) -> int:
    return len(self.manifest['models'])

  def _per_token(self, x: np.ndarray) -> np.ndarray:
    n = np.maximum(self.count, 1).astype(np.float64)
    return x / n.reshape((-1,) + (1,) * (x.ndim - 1))

  def mean(self, site: str) -> np.ndarray:
    """E_t[h] per model, layer and channel: `[M, L, C]` float64."""
    return self._per_token(self.arrays[site]['sum'].astype(np.float64))

  def mean_abs(self, site: str) -> np.ndarray:
    """E_t[|h|]: `[M, L, C]` float64."""
    return self._per_token(self.arrays[site]['sum_abs'].astype(np.float64))

  def var(self, site: str) -> np.ndarray:
    """E_t[h^2] - E_t[h]^2 (population variance, clipped at 0): `[M, L, C]`."""
    sq = self._per_token(self.arrays[site]['sum_sq'].astype(np.float64))
    return np.maximum(sq - self.mean(site)**2, 0.0)

  def pair_mean_abs_diff(self, site: str, i: int | None = None,
                         j: int | None = None) -> np.ndarray:
    """E_t|h_i - h_j|: `[M, M, L, C]`, or `[L, C]` for one pair (i, j)."""
    if 'pair_abs_diff' not in self.arrays[site]:
      raise StatsError(f'{self.manifest.get("dir", "stats")}: no pairwise '
                       f'statistics (collected with {self.num_models} model)')
    x = self._per_token(self.arrays[site]['pair_abs_diff'].astype(np.float64))
    return x if i is None else x[i, j]


def _expected_shapes(manifest: dict[str, Any]) -> dict[str, tuple[int, ...]]:
  m, l = len(manifest['models']), manifest['num_layers']
  shapes = {'count': (m,)}
  for site in manifest['sites']:
    c = manifest['channels'][site]
    for s in PER_MODEL_STATS:
      shapes[f'{site}/{s}'] = (m, l, c)
    if manifest['pairwise']:
      shapes[f'{site}/pair_abs_diff'] = (m, m, l, c)
    if manifest.get('attribution'):
      shapes[f'{site}/pair_attribution'] = (m, m, l, c)
  return shapes


def save_stats(out_dir: str, flat: dict[str, np.ndarray],
               manifest: dict[str, Any], overwrite: bool = False) -> str:
  """Writes `flat` arrays (keys `<site>/<stat>`, `count`) and the manifest.

  Atomic: written into a temporary sibling directory, then renamed to
  `out_dir`. An existing `out_dir` is an error unless `overwrite`, and even
  then only act-jax's own statistics directory is replaced (after success).
  """
  manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION)
  shapes = _expected_shapes(manifest)
  if set(flat) != set(shapes):
    raise StatsError(f'arrays {sorted(set(flat) ^ set(shapes))} do not match '
                     'the manifest')
  arrays = {}
  for k, shape in shapes.items():
    dt = np.int64 if k == 'count' else np.float32
    a = np.ascontiguousarray(np.asarray(flat[k]).astype(dt))
    if a.shape != shape:
      raise StatsError(f'array {k} has shape {a.shape}, expected {shape}')
    arrays[k] = a
  out_dir = os.path.abspath(out_dir)
  with atomic.atomic_dir(out_dir, overwrite, collective=False,
                         kind='stats') as tmp:
    save_file(arrays, os.path.join(tmp, ARRAYS_FILE))
    with open(os.path.join(tmp, MANIFEST_FILE), 'w') as f:
      json.dump(manifest, f, indent=2, sort_keys=True)
  return out_dir


def load_stats(stats_dir: str) -> Stats:
  """Reads and validates a statistics directory.

  Raises:
    StatsError naming the directory and the missing or misshapen array.
  """
  mpath = os.path.join(stats_dir, MANIFEST_FILE)
  apath = os.path.join(stats_dir, ARRAYS_FILE)
  for p in (mpath, apath):
    if not os.path.isfile(p):
      raise StatsError(f'{stats_dir}: missing {os.path.basename(p)} (not a '
                       'statistics directory, or an incomplete one)')
  with open(mpath) as f:
    manifest = json.load(f)
  if manifest.get('format') != FORMAT:
    raise StatsError(f'{mpath}: format is {manifest.get("format")!r}, '
                     f'expected {FORMAT!r}')
  flat = load_file(apath)
  for k, shape in _expected_shapes(manifest).items():
    if k not in flat:
      raise StatsError(f'{apath}: missing array {k!r}')
    if flat[k].shape != shape:
      raise StatsError(f'{apath}: array {k!r} has shape {flat[k].shape}, '
                       f'the manifest implies {shape}')
  arrays: dict[str, dict[str, np.ndarray]] = {s: {} for s in manifest['sites']}
  for k, v in flat.items():
    if k != 'count':
      site, stat = k.rsplit('/', 1)
      if site in arrays:
        arrays[site][stat] = v
  manifest['dir'] = os.path.abspath(stats_dir)
  return Stats(manifest, arrays, flat['count'])


def save_scores(path: str, scores: Mapping[str, np.ndarray]) -> str:
  """Writes `{name: [L, C]}` float32 scores to a safetensors file, atomically.

  Names are sites, or `<part>/<site>` for several score sets in one file.
  """
  arrays = {k: np.ascontiguousarray(np.asarray(v, np.float32))
            for k, v in scores.items()}
  with atomic.atomic_file(path) as tmp:
    save_file(arrays, tmp)
  return path


def load_scores(path: str, part: str | None = None) -> dict[str, np.ndarray]:
  """`{site: [L, C]}` from a scores file; `part` selects `<part>/<site>` keys.

  Raises:
    StatsError naming the file when it is missing or holds no such part.
  """
  if not os.path.isfile(path):
    raise StatsError(f'{path}: no scores file')
  flat = load_file(path)
  if part is None:
    return flat
  out = {k.split('/', 1)[1]: v for k, v in flat.items()
         if k.startswith(part + '/')}
  if not out:
    parts = sorted({k.split('/', 1)[0] for k in flat if '/' in k})
    raise StatsError(f'{path}: no scores of part {part!r}; parts: {parts}')
  return out


def make_manifest(model_paths, cfg, sites, probe: dict[str, Any],
                  flat: Mapping[str, np.ndarray], **extra) -> dict[str, Any]:
  """The manifest of statistics `flat` of `model_paths` (ModelConfig `cfg`)
  collected on a probe set described by `probe`; `extra` fields added."""
  return {
      'models': [{'path': os.path.abspath(p) if os.path.exists(p) else p}
                 for p in model_paths],
      'model_config': cfg.to_dict(), 'probe': probe,
      'num_tokens': int(np.asarray(flat['count'])[0]),
      'sites': list(sites),
      'channels': {s: capture.site_channels(cfg, s) for s in sites},
      'num_layers': cfg.num_layers, 'pairwise': len(model_paths) >= 2,
      'dtype': cfg.dtype, **extra}


def add_stats(parts: list[Stats]) -> dict[str, np.ndarray]:
  """Flat arrays of the union of disjoint probe sets: every statistic is a
  sum over tokens, so the union's is the sum (in float64, then float32)."""
  if not parts:
    raise StatsError('add_stats: nothing to add')
  ref = parts[0]
  for p in parts[1:]:
    if p.sites != ref.sites or p.num_models != ref.num_models:
      raise StatsError(f'add_stats: {p.manifest.get("dir")} has other '
                       f'sites or models than {ref.manifest.get("dir")}')
  flat = {'count': sum(p.count.astype(np.int64) for p in parts)}
  for site in ref.sites:
    for stat in ref.arrays[site]:
      flat[f'{site}/{stat}'] = sum(
          p.arrays[site][stat].astype(np.float64) for p in parts
      ).astype(np.float32)
  return flat


def as_stats(flat: Mapping[str, np.ndarray],
             manifest: dict[str, Any]) -> Stats:
  """A `Stats` view of flat arrays (as `load_stats` returns), unsaved."""
  arrays: dict[str, dict[str, np.ndarray]] = {s: {} for s in manifest['sites']}
  for k, v in flat.items():
    if k != 'count':
      site, stat = k.rsplit('/', 1)
      arrays[site][stat] = np.asarray(v)
  return Stats(dict(manifest), arrays, np.asarray(flat['count']))
