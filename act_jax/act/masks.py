"""Channel masks: compact `{site: [L, C] bool}`, param trees, files, set ops.

All mask logic lives here (docs/method.md, steps 4-5).

A channel mask says which (layer, channel) of each site is transferred.
Transferable sites and what channel c of layer l means in the params:
  output sites (`self_attn.q_proj` ... `mlp.down_proj`): kernel column
    `kernel[l, :, c]` and `bias[l, c]` where the module has a bias;
  input sites `mlp.down_proj.in` (one MLP neuron) and `self_attn.o_proj.in`
    (one attention-output channel): kernel row `kernel[l, c, :]` of
    down_proj / o_proj (a row has no bias entry).
Everything else (embeddings, norms, lm_head, q/k norms) is False unless
`include` names it by regex on its dotted path, then the whole leaf is True.

Mask directory (atomic: temp sibling + rename):
  channels.json  {"<site>": {"<layer>": [c, ...]}}  every layer listed
  summary.json   per site and layer: selected count, fraction; totals
  meta.json      shapes {site: [L, C]}, model_config, source/target, ...
  scores.safetensors  the `[L, C]` scores the mask was selected from, when
                 known (`io.stats.save_scores`; merge policy max_score)
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from act_jax.io import atomic
from act_jax.io import hf_names
from act_jax.io import stats as stats_io
from act_jax.model import capture

INPUT_SITES = capture.INPUT_SITES
TRANSFERABLE_SITES = capture.TRANSFERABLE_SITES
CHANNELS_FILE = 'channels.json'
SUMMARY_FILE = 'summary.json'
META_FILE = 'meta.json'
SCORES_FILE = 'scores.safetensors'
UNITS = ('channel', 'neuron', 'head')

Mask = dict[str, np.ndarray]  # {site: [L, C] bool}


class MaskError(ValueError):
  """Bad mask, mask file, or mask/params mismatch; names site or file."""


def check_sites(sites: Iterable[str], known: Sequence[str] = TRANSFERABLE_SITES,
                what: str = 'mask') -> None:
  """Raises MaskError listing the known sites when one is unknown."""
  unknown = [s for s in sites if s not in known]
  if unknown:
    raise MaskError(f'{what}: unknown or non-transferable site(s) {unknown}; '
                    f'known sites: {", ".join(known)}')


def site_shapes(cfg) -> dict[str, tuple[int, int]]:
  """`{site: (L, C)}` for every transferable site of ModelConfig `cfg`."""
  return {s: (cfg.num_layers, capture.site_channels(cfg, s))
          for s in TRANSFERABLE_SITES}


def empty_mask(shapes: Mapping[str, Sequence[int]]) -> Mask:
  return {s: np.zeros(tuple(sh), bool) for s, sh in shapes.items()}


def full_mask(shapes: Mapping[str, Sequence[int]]) -> Mask:
  return {s: np.ones(tuple(sh), bool) for s, sh in shapes.items()}


# ---------------------------------------------------------------- set ops


def _binary(a: Mask, b: Mask, op, name: str) -> Mask:
  out = {}
  for s in list(a) + [s for s in b if s not in a]:
    x, y = a.get(s), b.get(s)
    if x is not None and y is not None and x.shape != y.shape:
      raise MaskError(f'{name}: site {s} has shape {x.shape} vs {y.shape}')
    x = np.zeros_like(y) if x is None else np.asarray(x, bool)
    y = np.zeros_like(x) if y is None else np.asarray(y, bool)
    out[s] = op(x, y)
  return out


def union(a: Mask, b: Mask) -> Mask:
  """Channels in `a` or `b` (a site missing from one side counts as empty)."""
  return _binary(a, b, np.logical_or, 'union')


def intersection(a: Mask, b: Mask) -> Mask:
  """Channels in both."""
  return _binary(a, b, np.logical_and, 'intersection')


def difference(a: Mask, b: Mask) -> Mask:
  """Channels in `a` and not in `b`."""
  return _binary(a, b, lambda x, y: x & ~y, 'difference')


def count(mask: Mask) -> int:
  """Total selected channels."""
  return int(sum(int(np.sum(m)) for m in mask.values()))


# ---------------------------------------------------------------- coupling


def couple(mask: Mask, cfg, unit: str = 'channel') -> Mask:
  """Grows a mask to whole units (copy; the input is unchanged).

  unit='neuron': an MLP neuron f of layer l is gate/up output channel f plus
    down_proj input row f (site `mlp.down_proj.in`); a neuron is selected when
    any of the three is.
  unit='head': head h is q_proj output channels [h*E, (h+1)*E) plus o_proj
    input rows of the same range (`self_attn.o_proj.in`) plus k/v output
    channels of kv head h // G (GQA group size G = H / K). A head is selected
    when any q or o_proj.in channel of it is; a kv head when any of its k/v
    channels is or any of its query heads is selected.
  Other sites are kept as they are.
  """
  if unit not in UNITS:
    raise MaskError(f'--unit={unit!r} unknown; one of {", ".join(UNITS)}')
  shapes = site_shapes(cfg)
  out = {s: np.array(m, bool) for s, m in mask.items()}
  get = lambda s: out.get(s, np.zeros(shapes[s], bool))
  if unit == 'neuron':
    n = (get('mlp.gate_proj') | get('mlp.up_proj') | get('mlp.down_proj.in'))
    for s in ('mlp.gate_proj', 'mlp.up_proj', 'mlp.down_proj.in'):
      out[s] = n.copy()
  elif unit == 'head':
    L, E = cfg.num_layers, cfg.head_dim
    H, K = cfg.num_heads, cfg.num_kv_heads
    g = H // K
    heads = (get('self_attn.q_proj') | get('self_attn.o_proj.in')
            ).reshape(L, H, E).any(-1)
    kv = (get('self_attn.k_proj') | get('self_attn.v_proj')
          ).reshape(L, K, E).any(-1)
    kv |= heads.reshape(L, K, g).any(-1)
    q_full = np.repeat(heads, E, axis=1)
    kv_full = np.repeat(kv, E, axis=1)
    out['self_attn.q_proj'] = q_full
    out['self_attn.o_proj.in'] = q_full.copy()
    out['self_attn.k_proj'] = kv_full
    out['self_attn.v_proj'] = kv_full.copy()
  return out


# ---------------------------------------------------------------- param trees


def _module_of(site: str) -> tuple[tuple[str, ...], str]:
  if site in INPUT_SITES:
    return tuple(site[:-len('.in')].split('.')), 'rows'
  return tuple(site.split('.')), 'cols'


def _paths(tree, prefix=()) -> list[tuple[tuple[str, ...], Any]]:
  out = []
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out += _paths(v, prefix + (k,))
    else:
      out.append((prefix + (k,), v))
  return out


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def leaf_masks(mask: Mask, params_like, include: Sequence[str] = (),
               full: bool = False) -> dict:
  """Boolean tree aligned with `params_like` (arrays or ShapeDtypeStructs).

  Args:
    mask: channel mask `{site: [L, C] bool}`.
    params_like: the param tree (only shapes are read).
    include: regexes on dotted leaf paths (e.g. 'norm.scale',
      'embed_tokens.*') whose whole leaf is selected.
    full: leaves of the full leaf shape; otherwise compact broadcastable
      leaves (`kernel` [L, 1, C] for columns, [L, R, 1] for rows, full when
      both; `bias` [L, C]; untouched leaves all-False of shape (1,) * ndim).

  Raises:
    MaskError on unknown sites or shapes that do not fit the params.
  """
  check_sites(mask)
  leaves = dict(_paths(params_like))
  cols: dict[tuple[str, ...], np.ndarray] = {}
  rows: dict[tuple[str, ...], np.ndarray] = {}
  for site, m in mask.items():
    m = np.asarray(m, bool)
    module, side = _module_of(site)
    kpath = ('layers',) + module + ('kernel',)
    if kpath not in leaves:
      raise MaskError(f'site {site}: params have no leaf {".".join(kpath)}')
    shape = tuple(leaves[kpath].shape)
    want = (shape[0], shape[2] if side == 'cols' else shape[1])
    if m.shape != want:
      raise MaskError(f'site {site}: mask shape {m.shape} does not match '
                      f'{".".join(kpath)} {shape} (expected {want})')
    (cols if side == 'cols' else rows)[kpath] = m
  out: dict = {}
  patterns = [re.compile(p) for p in include]
  for path, leaf in leaves.items():
    shape = tuple(leaf.shape)
    dotted = '.'.join(path)
    kpath = path[:-1] + ('kernel',)
    if any(p.fullmatch(dotted) for p in patterns):
      m = np.ones((1,) * len(shape), bool)
    elif path[-1] == 'kernel' and (path in cols or path in rows):
      c = cols.get(path)
      r = rows.get(path)
      m = np.zeros((shape[0], 1, 1), bool)
      if c is not None:
        m = m | c[:, None, :]
      if r is not None:
        m = m | r[:, :, None]
    elif path[-1] == 'bias' and kpath in cols:
      m = cols[kpath]
    else:
      m = np.zeros((1,) * len(shape), bool)
    if full:
      m = np.broadcast_to(m, shape).copy()
    _set(out, path, m)
  return out


def hf_tensor_masks(mask: Mask, cfg) -> dict[str, dict[str, list[int]]]:
  """The mask keyed by HF tensor name, for PyTorch and mergekit users.

  `{"model.layers.3.mlp.down_proj.weight": {"rows": [...], "cols": [...]},
  "model.layers.3.self_attn.q_proj.bias": {"rows": [...]}, ...}`: the
  selected entries of an HF weight `W[d_out, d_in]` are its listed rows
  (output channels: `W[rows, :]`) and listed columns (input channels of
  the `*.in` sites: `W[:, cols]`); of a bias, its listed entries. Tensors
  with nothing selected are left out. Applying it (`W_t[rows] = W_s[rows]`,
  `W_t[:, cols] = W_s[:, cols]`) is the transplant at alpha = 1.
  """
  check_sites(mask)
  keys = hf_names.hf_key_table(cfg)
  out: dict[str, dict[str, list[int]]] = {}
  for site in sorted(mask):
    module, side = _module_of(site)
    m = np.asarray(mask[site], bool)
    for layer in range(m.shape[0]):
      sel = np.flatnonzero(m[layer]).tolist()
      if not sel:
        continue
      name = f'model.layers.{layer}.{".".join(module)}'
      if name + '.weight' not in keys:
        raise MaskError(f'site {site}: the HF checkpoint has no tensor '
                        f'{name}.weight')
      # Our kernel columns (output channels) are HF weight rows.
      axis = 'rows' if side == 'cols' else 'cols'
      entry = out.setdefault(name + '.weight', {})
      entry[axis] = sorted(set(entry.get(axis, [])) | set(sel))
      if side == 'cols' and name + '.bias' in keys:
        out[name + '.bias'] = {'rows': sel}
  return out


# ---------------------------------------------------------------- files


def to_channels(mask: Mask) -> dict[str, dict[str, list[int]]]:
  """`{"<site>": {"<layer>": [c, ...]}}` (every layer, sorted channels)."""
  return {s: {str(l): np.flatnonzero(m[l]).tolist() for l in range(len(m))}
          for s, m in mask.items()}


def from_channels(channels: Mapping[str, Mapping[str, Sequence[int]]],
                  shapes: Mapping[str, Sequence[int]],
                  source: str = CHANNELS_FILE) -> Mask:
  """Inverse of `to_channels`; checks sites, layers and channel ranges."""
  check_sites(channels, what=source)
  out = {}
  for site, per_layer in channels.items():
    if site not in shapes:
      raise MaskError(f'{source}: site {site} has no shape in meta.json')
    L, C = shapes[site]
    m = np.zeros((L, C), bool)
    for layer, chans in per_layer.items():
      l = int(layer)
      if not 0 <= l < L:
        raise MaskError(f'{source}: {site} layer {layer} outside [0, {L})')
      c = np.asarray(chans, np.int64)
      if c.size and (c.min() < 0 or c.max() >= C):
        raise MaskError(f'{source}: {site} layer {layer} has channels '
                        f'outside [0, {C})')
      m[l, c] = True
    out[site] = m
  return out


def summarize(mask: Mask) -> dict[str, Any]:
  """Per site and layer counts / fractions, plus totals."""
  sites = {}
  tot_sel = tot_all = 0
  for s, m in mask.items():
    sel = m.sum(-1)
    sites[s] = {'count_per_layer': sel.tolist(),
                'fraction_per_layer': (sel / m.shape[1]).tolist(),
                'count': int(sel.sum()), 'channels': int(m.size),
                'fraction': float(sel.sum() / m.size)}
    tot_sel += int(sel.sum())
    tot_all += int(m.size)
  return {'sites': sites, 'count': tot_sel, 'channels': tot_all,
          'fraction': tot_sel / tot_all if tot_all else 0.0}


def mask_files(mask: Mask, meta: Mapping[str, Any] | None = None
               ) -> dict[str, Any]:
  """The three JSON files of a mask directory."""
  meta = dict(meta or {})
  meta['shapes'] = {s: list(m.shape) for s, m in mask.items()}
  return {CHANNELS_FILE: to_channels(mask), SUMMARY_FILE: summarize(mask),
          META_FILE: meta}


def save_masks(out_dir: str, mask: Mask,
               meta: Mapping[str, Any] | None = None,
               scores: Mapping[str, np.ndarray] | None = None,
               overwrite: bool = False) -> str:
  """Writes a mask directory atomically (with its scores, if given); an
  existing one is replaced only with `overwrite` and only if it is an
  act-jax mask directory."""
  check_sites(mask)
  out_dir = os.path.abspath(out_dir)
  with atomic.atomic_dir(out_dir, overwrite, collective=False,
                         kind='masks') as tmp:
    write_mask_files(tmp, mask, meta, scores)
  return out_dir


def write_mask_files(dir_: str, mask: Mask,
                     meta: Mapping[str, Any] | None = None,
                     scores: Mapping[str, np.ndarray] | None = None) -> None:
  """The mask files (and `scores.safetensors`) into an existing `dir_`."""
  for name, content in mask_files(mask, meta).items():
    with open(os.path.join(dir_, name), 'w') as f:
      json.dump(content, f, indent=1, sort_keys=True)
  if scores is not None:
    stats_io.save_scores(os.path.join(dir_, SCORES_FILE), scores)


def load_masks(mask_dir: str) -> tuple[Mask, dict[str, Any]]:
  """Reads a mask directory -> (mask, meta)."""
  paths = {n: os.path.join(mask_dir, n) for n in (CHANNELS_FILE, META_FILE)}
  for p in paths.values():
    if not os.path.isfile(p):
      raise MaskError(f'{mask_dir}: missing {os.path.basename(p)} (not a '
                      'mask directory)')
  with open(paths[META_FILE]) as f:
    meta = json.load(f)
  with open(paths[CHANNELS_FILE]) as f:
    channels = json.load(f)
  if 'shapes' not in meta:
    raise MaskError(f'{paths[META_FILE]}: missing "shapes"')
  return from_channels(channels, meta['shapes'], paths[CHANNELS_FILE]), meta


def load_mask_scores(mask_dir: str) -> dict[str, np.ndarray]:
  """The scores saved beside a mask (needed for merge policy max_score)."""
  path = os.path.join(mask_dir, SCORES_FILE)
  if not os.path.isfile(path):
    raise MaskError(f'{mask_dir}: no {SCORES_FILE} (needed for '
                    '--policy=max_score)')
  return stats_io.load_scores(path)
