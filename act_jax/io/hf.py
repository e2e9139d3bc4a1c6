"""HF checkpoint directories <-> act-jax params, both directions.

Reading (`load_hf_params`) is strict and streaming:
  1. Validate before reading any tensor data: config.json, the shard index
     (every file it names must exist inside the checkpoint dir, and no file
     may be a symlink resolving outside it unless `follow_symlinks`, which
     the HF hub cache's snapshots -> blobs layout needs), every
     safetensors header (corrupt/truncated files are named), and the full
     key set and every shape against `hf_names` (missing, unexpected and
     mis-shaped tensors are named with their file).
  2. Fill one stacked leaf at a time on the host from the memory-mapped
     shards (no torch: safetensors' numpy API; bf16 arrives as
     `ml_dtypes.bfloat16`), cast it, place it straight onto its
     NamedSharding and drop the host copy. Peak host memory is about one
     model copy (the placed params) plus one leaf.
Writing (`save_hf`) streams too: sharded safetensors
(`model-00001-of-0000N.safetensors` + index, or one `model.safetensors`), a
`config.json` from `config.to_hf_config` on top of the source config.json
when one is given (token ids, chat settings etc. survive; code references
such as `auto_map` do not), tokenizer files and a README.md model card (from `io.card`), all
into a temporary sibling renamed into place at the end. `ShardWriter` lays
the shards out up front and writes each tensor straight to its place, so
one leaf is on the host at a time. From a multi-process mesh every process
walks the leaves (each sharded leaf is gathered in turn) and process 0
writes. The key table between HF tensor names and our leaves is
`hf_names`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import time
from typing import Any

from absl import logging
import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open

from act_jax import distributed
from act_jax.io import atomic
from act_jax.io import hf_names
from act_jax.io import inputs
from act_jax.io import params as params_io
from act_jax.model import config as config_lib
from act_jax.model import forward
from act_jax.model import sharding
from act_jax.model.config import ModelConfig, from_hf_config

SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
# safetensors header dtype -> numpy dtype we accept for weights.
_DTYPES = {'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16),
           'BF16': np.dtype(ml_dtypes.bfloat16), 'F64': np.dtype(np.float64)}
_PARAM_DTYPES = ('float32', 'bfloat16', 'float16')


class ConversionError(ValueError):
  """A checkpoint that cannot be converted; the message names file and key."""


def read_hf_config_dict(hf_dir: str,
                        follow_symlinks: bool = False) -> dict[str, Any]:
  """The parsed `hf_dir/config.json`.

  Raises:
    ConversionError naming the file when it is missing or not JSON;
    UnsafeInputError when it is a symlink out of `hf_dir` (and not
    `follow_symlinks`).
  """
  path = os.path.join(hf_dir, 'config.json')
  if not os.path.isfile(path):
    raise ConversionError(f'{path}: missing config.json (is {hf_dir} an HF '
                          'checkpoint directory?)')
  inputs.resolve_inside(hf_dir, 'config.json', follow_symlinks)
  try:
    with open(path) as f:
      d = json.load(f)
  except json.JSONDecodeError as e:
    raise ConversionError(f'{path}: invalid JSON ({e})') from None
  if not isinstance(d, dict):
    raise ConversionError(f'{path}: expected a JSON object')
  return d


def checkpoint_dtype(hf_config: dict[str, Any]) -> str:
  """The dtype config.json records (`dtype`/`torch_dtype`), else float32."""
  name = str(hf_config.get('dtype') or hf_config.get('torch_dtype') or '')
  return name if name in _PARAM_DTYPES else 'float32'


def load_hf_config(hf_dir: str, dtype: str = 'float32',
                   param_dtype: str = 'float32',
                   follow_symlinks: bool = False) -> ModelConfig:
  """ModelConfig from `hf_dir/config.json`.

  Raises:
    ConversionError when config.json is missing or not JSON; ConfigError
    naming the file and the field it cannot honour.
  """
  hf = read_hf_config_dict(hf_dir, follow_symlinks)
  return from_hf_config(hf, source=os.path.join(hf_dir, 'config.json'),
                        dtype=dtype, param_dtype=param_dtype)


def _inside(hf_dir: str, name: str, index: str,
            follow_symlinks: bool = False) -> str:
  """Path of `name` from the index, which must stay inside `hf_dir`.

  Lexically (no `..` escape, no absolute path) and, unless
  `follow_symlinks`, after resolving symlinks (`inputs.resolve_inside`).
  """
  if not isinstance(name, str) or not name or os.path.isabs(name):
    raise ConversionError(f'{index}: file {name!r} must be a relative path '
                          'inside the checkpoint directory')
  root = os.path.abspath(hf_dir)
  path = os.path.normpath(os.path.join(root, name))
  if os.path.commonpath([root, path]) != root:
    raise ConversionError(f'{index}: file {name!r} resolves outside the '
                          f'checkpoint directory {hf_dir}')
  inputs.resolve_inside(hf_dir, name, follow_symlinks,
                        f'{path} (named in {index})')
  return path


def checkpoint_files(hf_dir: str, follow_symlinks: bool = False
                    ) -> tuple[list[str], dict[str, str] | None]:
  """The safetensors files of `hf_dir` and the index's `{key: file}` if any.

  Raises:
    ConversionError naming the index entry or the missing file;
    UnsafeInputError naming a file (index or shard) that is a symlink
    resolving outside `hf_dir`, unless `follow_symlinks`.
  """
  index = os.path.join(hf_dir, INDEX_FILE)
  if not os.path.isfile(index):
    single = os.path.join(hf_dir, SINGLE_FILE)
    if not os.path.isfile(single):
      raise ConversionError(f'{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE} '
                            '(only safetensors checkpoints are read)')
    inputs.resolve_inside(hf_dir, SINGLE_FILE, follow_symlinks)
    return [single], None
  inputs.resolve_inside(hf_dir, INDEX_FILE, follow_symlinks)
  try:
    with open(index) as f:
      weight_map = json.load(f).get('weight_map')
  except (json.JSONDecodeError, AttributeError) as e:
    raise ConversionError(f'{index}: invalid index JSON ({e})') from None
  if not isinstance(weight_map, dict) or not weight_map:
    raise ConversionError(f'{index}: missing or empty "weight_map"')
  key_file, files = {}, []
  for key, name in weight_map.items():
    path = _inside(hf_dir, name, index, follow_symlinks)
    if path not in files:
      if not os.path.isfile(path):
        raise ConversionError(f'{index}: shard {name!r} (holding {key!r}) '
                              f'does not exist: {path}')
      files.append(path)
    key_file[key] = path
  return files, key_file


def read_headers(files: list[str]) -> dict[str, tuple[str, tuple, str]]:
  """`{key: (file, shape, dtype)}` from the safetensors headers only.

  Raises:
    ConversionError naming a corrupt/truncated file or a duplicated key.
  """
  out = {}
  for path in files:
    try:
      with safe_open(path, framework='numpy') as f:
        for key in f.keys():
          s = f.get_slice(key)
          if key in out:
            raise ConversionError(f'{path}: tensor {key!r} also in '
                                  f'{out[key][0]}')
          out[key] = (path, tuple(s.get_shape()), s.get_dtype())
    except ConversionError:
      raise
    except Exception as e:  # safetensors raises its own Rust error types
      raise ConversionError(f'{path}: corrupt or truncated safetensors file '
                            f'({e})') from None
  return out


def tensor_dtype(file: str, key: str) -> np.dtype:
  """The numpy dtype of tensor `key` in safetensors `file` (header only)."""
  with safe_open(file, framework='numpy') as f:
    name = f.get_slice(key).get_dtype()
  if name not in _DTYPES:
    raise ConversionError(f'{file}: tensor {key!r} has unsupported dtype '
                          f'{name} (supported: {", ".join(_DTYPES)})')
  return _DTYPES[name]


def validate_checkpoint(cfg: ModelConfig, headers: dict[str, tuple],
                        key_file: dict[str, str] | None,
                        where: str) -> None:
  """Checks keys, shapes and dtypes of all tensors against `cfg`.

  Raises:
    ConversionError listing every missing, unexpected or mis-shaped tensor
    with its file, expected and found shape.
  """
  problems = []
  if key_file is not None:
    for key, path in key_file.items():
      if key not in headers:
        problems.append(f'index names tensor {key!r} but {path} lacks it')
      elif headers[key][0] != path:
        problems.append(f'index puts {key!r} in {path}, found in '
                        f'{headers[key][0]}')
    for key, (path, _, _) in headers.items():
      if key not in key_file:
        problems.append(f'tensor {key!r} in {path} is not in the index')
  abstract = forward.abstract_params(cfg)
  table = hf_names.hf_key_table(cfg)
  for key, e in table.items():
    if key not in headers:
      problems.append(f'missing tensor {key!r} (expected in {where})')
      continue
    path, shape, dtype = headers[key]
    want = hf_names.hf_shape(e, _leaf(abstract, e.path).shape)
    if shape != want:
      problems.append(f'tensor {key!r} in {path}: expected shape {want}, '
                      f'found {shape}')
    if dtype not in _DTYPES:
      problems.append(f'tensor {key!r} in {path}: unsupported dtype {dtype} '
                      f'(supported: {", ".join(_DTYPES)})')
  optional = hf_names.optional_hf_keys(cfg)
  for key, (path, _, _) in headers.items():
    if key not in table and key not in optional:
      problems.append(f'unexpected tensor {key!r} in {path} (no place for it'
                      f' in a {cfg.model_type} model of this config)')
  if problems:
    more = f' (+{len(problems) - 10} more)' if len(problems) > 10 else ''
    raise ConversionError(f'{where}: ' + '; '.join(problems[:10]) + more)


def _leaf(tree: dict, path: tuple[str, ...]) -> Any:
  for p in path:
    tree = tree[p]
  return tree


def _set_leaf(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _place(host: np.ndarray, target: jax.sharding.Sharding | None):
  """Puts a host array onto `target` (or the default device)."""
  if target is None:
    sharding.note_single_device()
    return jax.device_put(host)
  # Works when the mesh spans processes too: each process fills its shards.
  return jax.make_array_from_callback(host.shape, target,
                                      lambda idx: host[idx])


def load_hf_params(hf_dir: str, cfg: ModelConfig | None = None, *,
                   mesh: jax.sharding.Mesh | None = None,
                   rules=sharding.DEFAULT_RULES,
                   param_dtype: str | None = None,
                   follow_symlinks: bool = False
                   ) -> tuple[ModelConfig, dict[str, Any]]:
  """Reads an HF checkpoint dir into `(cfg, params)`, strictly, streaming.

  Args:
    hf_dir: holds config.json and model.safetensors, or an index + shards.
    cfg: use this config instead of reading config.json.
    mesh: place every leaf on its NamedSharding (`forward.logical_axes` +
      `rules`); default: the default device.
    rules: logical axis rules for `mesh`.
    param_dtype: dtype to store params in; default `cfg.param_dtype` when
      `cfg` is given, else the dtype config.json records (float32 if none).
    follow_symlinks: accept files that are symlinks out of `hf_dir`.

  Raises:
    ConversionError naming the file (and key) at fault, before any tensor
    data is read.
  """
  if param_dtype is not None and param_dtype not in _PARAM_DTYPES:
    raise ConversionError(f'param_dtype {param_dtype!r} is not one of '
                          f'{", ".join(_PARAM_DTYPES)}')
  if cfg is None:
    dt = param_dtype or checkpoint_dtype(read_hf_config_dict(
        hf_dir, follow_symlinks))
    cfg = load_hf_config(hf_dir, param_dtype=dt,
                         follow_symlinks=follow_symlinks)
  elif param_dtype is not None:
    cfg = cfg.replace(param_dtype=param_dtype)
  files, key_file = checkpoint_files(hf_dir, follow_symlinks)
  headers = read_headers(files)
  where = os.path.join(hf_dir, INDEX_FILE if key_file else SINGLE_FILE)
  validate_checkpoint(cfg, headers, key_file, where)

  abstract = forward.abstract_params(cfg)
  targets = None
  if mesh is not None:
    targets = sharding.tree_shardings(mesh, forward.logical_axes(cfg),
                                      abstract, rules)
  by_path = collections.defaultdict(list)
  for e in hf_names.hf_entries(cfg):
    by_path[e.path].append(e)
  params: dict[str, Any] = {}
  start, done_bytes = time.time(), 0
  total_bytes = sum(x.size * x.dtype.itemsize
                    for x in jax.tree.leaves(abstract))
  for n, (path, entries) in enumerate(by_path.items(), start=1):
    leaf = _leaf(abstract, path)
    host = np.empty(leaf.shape, leaf.dtype)
    # Files are opened (memory-mapped) per leaf and closed right after, so
    # the mapped pages of already-placed leaves leave our resident set.
    with contextlib.ExitStack() as stack:
      handles = {}
      for e in entries:
        file = headers[e.hf_key][0]
        if file not in handles:
          handles[file] = stack.enter_context(safe_open(file, 'numpy'))
        t = handles[file].get_tensor(e.hf_key)
        t = t.T if e.transpose else t
        if e.layer is None:
          host[...] = t
        else:
          host[e.layer] = t
        del t
    target = _leaf(targets, path) if targets is not None else None
    _set_leaf(params, path, _place(host, target))
    done_bytes += host.nbytes
    del host
    elapsed = max(time.time() - start, 1e-6)
    logging.log_every_n_seconds(
        logging.INFO, 'converted %d/%d leaves, %.0f/%.0f MB, %.1f MB/s, '
        'ETA %.0f s', 5, n, len(by_path), done_bytes / 2**20,
        total_bytes / 2**20, done_bytes / 2**20 / elapsed,
        (total_bytes - done_bytes) * elapsed / max(done_bytes, 1))
  logging.info('loaded %s from %s: %d params (%s) in %.1f s', cfg.model_type,
               hf_dir, total_bytes // np.dtype(cfg.param_dtype).itemsize,
               cfg.param_dtype, time.time() - start)
  return cfg, params


# ------------------------------------------------------------------ export


_ST_DTYPES = {np.dtype(np.float32): 'F32', np.dtype(np.float16): 'F16',
              np.dtype(ml_dtypes.bfloat16): 'BF16',
              np.dtype(np.float64): 'F64'}


class ShardWriter:
  """Writes HF-named tensors into safetensors shards as they come.

  The layout is fixed up front from every tensor's key, shape and dtype:
  which shard holds it (a new shard starts before one would exceed
  `max_shard_bytes`) and its byte range. Each shard's header is written
  first, so every tensor is written straight to its place and nothing is
  held beyond the tensor being written (peak host memory: one tensor).
  `close()` checks every tensor was written and writes the index.

  Shards are `model.safetensors` (one) or `model-0000i-of-0000N.safetensors`
  plus `model.safetensors.index.json`, as transformers writes them.
  """

  def __init__(self, out_dir: str, specs: list[tuple[str, tuple, Any]],
               max_shard_bytes: int = 2**30):
    """`specs`: `(key, shape, dtype)` of every tensor, in writing order."""
    self.out_dir = out_dir
    groups, cur, size = [], [], 0
    for key, shape, dtype in specs:
      dtype = np.dtype(dtype)
      if dtype not in _ST_DTYPES:
        raise ConversionError(f'tensor {key}: dtype {dtype} cannot be '
                              'written to safetensors here')
      nbytes = int(np.prod(shape)) * dtype.itemsize
      if cur and size + nbytes > max_shard_bytes:
        groups.append(cur)
        cur, size = [], 0
      cur.append((key, tuple(int(d) for d in shape), dtype, nbytes))
      size += nbytes
    if cur:
      groups.append(cur)
    n = len(groups)
    self.names = [SINGLE_FILE if n == 1 else
                  f'model-{i:05d}-of-{n:05d}.safetensors'
                  for i in range(1, n + 1)]
    self._where: dict[str, tuple[str, int, tuple, np.dtype]] = {}
    self.total = 0
    for name, group in zip(self.names, groups):
      header, offset = {'__metadata__': {'format': 'pt'}}, 0
      for key, shape, dtype, nbytes in group:
        header[key] = {'dtype': _ST_DTYPES[dtype], 'shape': list(shape),
                       'data_offsets': [offset, offset + nbytes]}
        offset += nbytes
      blob = json.dumps(header, separators=(',', ':')).encode()
      blob += b' ' * (-len(blob) % 8)  # data starts 8-byte aligned
      start = 8 + len(blob)
      path = os.path.join(out_dir, name)
      with open(path, 'wb') as f:
        f.write(len(blob).to_bytes(8, 'little'))
        f.write(blob)
        f.truncate(start + offset)
      for key, shape, dtype, nbytes in group:
        self._where[key] = (path, start + header[key]['data_offsets'][0],
                            shape, dtype)
      self.total += offset
    self._written: set[str] = set()

  def write(self, key: str, array: np.ndarray) -> None:
    """Writes one tensor (shape and dtype as declared) to its place."""
    if key not in self._where:
      raise ConversionError(f'tensor {key} was not declared to the writer')
    if key in self._written:
      raise ConversionError(f'tensor {key} written twice')
    path, offset, shape, dtype = self._where[key]
    a = np.ascontiguousarray(array)
    if a.shape != shape or a.dtype != dtype:
      raise ConversionError(f'tensor {key} is {a.shape} {a.dtype}, declared '
                            f'{shape} {dtype}')
    with open(path, 'r+b') as f:
      f.seek(offset)
      f.write(a.reshape(-1).view(np.uint8))
    self._written.add(key)

  def close(self) -> dict[str, str]:
    """Checks completeness, writes the index; returns `{key: file}`."""
    missing = sorted(set(self._where) - self._written)
    if missing:
      raise ConversionError(f'{len(missing)} tensors never written, e.g. '
                            f'{missing[0]}')
    key_file = {k: os.path.basename(w[0]) for k, w in self._where.items()}
    if len(self.names) > 1:
      with open(os.path.join(self.out_dir, INDEX_FILE), 'w') as f:
        json.dump({'metadata': {'total_size': self.total},
                   'weight_map': dict(sorted(key_file.items()))}, f, indent=2)
    return key_file


def hf_tensor_specs(cfg: ModelConfig, dtype) -> list[tuple[str, tuple, Any]]:
  """`(key, shape, dtype)` of every HF tensor of `cfg`, in `hf_entries`
  order (what a `ShardWriter` for an export of `cfg` is given)."""
  abstract = forward.abstract_params(cfg)
  return [(e.hf_key, hf_names.hf_shape(e, _leaf(abstract, e.path).shape),
           np.dtype(dtype)) for e in hf_names.hf_entries(cfg)]


def _write_shards(params: dict[str, Any], cfg: ModelConfig, out_dir: str,
                  max_shard_bytes: int, dtype: str) -> tuple[list[str], int]:
  """Writes tensors leaf by leaf; returns the shard names and bytes.

  Every process walks the leaves (a leaf sharded over several processes is
  gathered, one leaf at a time); process 0 writes.
  """
  writer = None
  if distributed.is_primary():
    writer = ShardWriter(out_dir, hf_tensor_specs(cfg, dtype),
                         max_shard_bytes)
  by_path = collections.OrderedDict()
  for e in hf_names.hf_entries(cfg):
    by_path.setdefault(e.path, []).append(e)
  for path, entries in by_path.items():
    host = sharding.to_host(_leaf(params, path))
    if writer is not None:
      for e in entries:
        t = host[e.layer] if e.layer is not None else host
        writer.write(e.hf_key, t.T if e.transpose else t)
    del host
  if writer is None:
    return [], 0
  writer.close()
  return writer.names, writer.total


def save_hf(params: dict[str, Any], cfg: ModelConfig, out_dir: str, *,
            hf_config: dict[str, Any] | None = None,
            tokenizer_dir: str | None = None, model_card: str | None = None,
            max_shard_bytes: int = 2**30, overwrite: bool = False,
            follow_symlinks: bool = False) -> None:
  """Writes `params` as an HF checkpoint directory, atomically.

  Args:
    params: the param tree of `cfg` (all leaves one dtype, written as is).
    cfg: its ModelConfig.
    out_dir: output directory; must not exist unless `overwrite`.
    hf_config: the source config.json dict, whose other fields are kept.
    tokenizer_dir: copy tokenizer / generation config files from here.
    model_card: README.md text (`io.card`: the one place cards are
      written); none when None.
    max_shard_bytes: start a new shard before exceeding this size.
    overwrite: replace an existing `out_dir` (act-jax's own HF export).
    follow_symlinks: copy tokenizer files that are symlinks out of
      `tokenizer_dir` too.

  Raises:
    ConversionError / CheckpointError naming what does not match, before
    anything is written.
  """
  dtypes = {np.dtype(x.dtype).name for x in jax.tree.leaves(params)}
  if len(dtypes) != 1:
    raise ConversionError(f'params mix dtypes {sorted(dtypes)}; cast first')
  dtype = dtypes.pop()
  cfg = cfg.replace(param_dtype=dtype)
  params_io.check_tree(params, forward.abstract_params(cfg), 'save_hf params')
  try:
    config = config_lib.to_hf_config(cfg, hf_config, dtype)
  except config_lib.ConfigError as e:
    raise ConversionError(str(e)) from None
  with atomic.atomic_dir(out_dir, overwrite, kind='hf') as tmp:
    names, _ = _write_shards(params, cfg, tmp, max_shard_bytes, dtype)
    if distributed.is_primary():
      with open(os.path.join(tmp, 'config.json'), 'w') as f:
        json.dump(config, f, indent=2, sort_keys=True)
      params_io.copy_aux_files(tokenizer_dir, tmp, follow_symlinks)
      if model_card is not None:
        with open(os.path.join(tmp, 'README.md'), 'w') as f:
          f.write(model_card)
  logging.info('saved HF checkpoint (%d files, %s) to %s', len(names), dtype,
               out_dir)
