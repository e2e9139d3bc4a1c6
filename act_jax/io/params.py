"""Params directories: orbax save/restore of param pytrees, with validation.

A converted params dir looks like:
  model_config.json   ModelConfig.to_json() (the architecture, param dtype)
  hf_config.json      the source HF config.json, kept for a faithful export
  meta.json           free-form provenance (source path, act-jax version...)
  tokenizer files     copied from the source so the dir is self-contained
  params/             an orbax StandardCheckpointer checkpoint of the tree
Every output directory is written into a temporary sibling and renamed into
place only when complete (`atomic.atomic_dir`, marker kind 'params'): a
failure leaves nothing behind.
Files from a stranger's checkpoint are checked before they are read or
copied: a tokenizer / chat-template file or a params file that is a symlink
resolving outside its directory is refused unless `follow_symlinks`
(`inputs.resolve_inside`), and a copied `tokenizer_config.json` loses its
`auto_map` (a reference to code to run), as an exported config.json does.
Restores check every leaf's shape and dtype against `forward.abstract_params`
and name the first mismatch before any tensor data is read.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from act_jax import distributed
from act_jax.io import atomic
from act_jax.io import inputs
from act_jax.model import forward
from act_jax.model import sharding
from act_jax.model.config import ModelConfig

MODEL_CONFIG = 'model_config.json'
HF_CONFIG = 'hf_config.json'
META = 'meta.json'
PARAMS = 'params'
# Files that make a directory loadable by AutoTokenizer / generate().
AUX_FILES = ('tokenizer.json', 'tokenizer_config.json',
             'special_tokens_map.json', 'added_tokens.json', 'vocab.json',
             'merges.txt', 'tokenizer.model', 'chat_template.jinja',
             'chat_template.json', 'generation_config.json')


class CheckpointError(ValueError):
  """A params dir or pytree checkpoint that does not match what is expected."""


# Keys of tokenizer_config.json that make transformers import and run code
# shipped with a checkpoint: never copied into an output.
CODE_KEYS = ('auto_map',)


def copy_aux_files(src_dir: str | None, dst_dir: str,
                   follow_symlinks: bool = False) -> list[str]:
  """Copies tokenizer / generation files present in `src_dir`; returns them.

  `tokenizer_config.json` is copied without its code references
  (`CODE_KEYS`); the other files byte for byte.

  Raises:
    UnsafeInputError naming a file that is a symlink resolving outside
    `src_dir` (unless `follow_symlinks`), before anything is copied.
  """
  if not src_dir:
    return []
  present = [n for n in AUX_FILES if os.path.isfile(os.path.join(src_dir, n))]
  for name in present:
    inputs.resolve_inside(src_dir, name, follow_symlinks)
  for name in present:
    src, dst = os.path.join(src_dir, name), os.path.join(dst_dir, name)
    if name == 'tokenizer_config.json':
      try:
        with open(src, encoding='utf-8') as f:
          tc = json.load(f)
      except ValueError as e:
        raise CheckpointError(f'{src}: invalid JSON ({e})') from None
      if isinstance(tc, dict) and any(k in tc for k in CODE_KEYS):
        _write_json(dst, {k: v for k, v in tc.items() if k not in CODE_KEYS})
        continue
    shutil.copyfile(src, dst)
  return present


def _write_json(path: str, obj: Any) -> None:
  with open(path, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write('\n')


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f'{path}: file not found') from None
  except json.JSONDecodeError as e:
    raise CheckpointError(f'{path}: invalid JSON ({e})') from None


def save_pytree(path: str, tree: Any) -> None:
  """Saves a pytree of arrays with orbax; `path` must not exist. Blocks."""
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.abspath(path), tree)
  ckptr.wait_until_finished()
  ckptr.close()


def pytree_metadata(path: str) -> Any:
  """The saved tree of `ArrayMetadata` (shape, dtype) at `path`; reads no data.

  Raises:
    CheckpointError naming `path` when it is not an orbax checkpoint.
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f'{path}: no orbax checkpoint here')
  with ocp.StandardCheckpointer() as ckptr:
    try:
      return ckptr.metadata(path).item_metadata.tree
    except (FileNotFoundError, ValueError) as e:
      raise CheckpointError(f'{path}: unreadable orbax checkpoint ({e})') from e


def restore_pytree(path: str, target: Any = None) -> Any:
  """Restores the pytree at `path`.

  Args:
    path: an orbax checkpoint written by `save_pytree`.
    target: None (restore as saved, on the default device), a tree of
      `jax.ShapeDtypeStruct` (optionally with `.sharding`), or a tree of
      `jax.sharding.Sharding` (shapes and dtypes taken from the checkpoint).
  """
  path = os.path.abspath(path)
  meta = pytree_metadata(path)
  if target is None:
    dev = sharding.single_device()
    target = jax.tree.map(lambda m: dev, meta)
  leaves = jax.tree.leaves(target)
  if leaves and isinstance(leaves[0], jax.sharding.Sharding):
    target = jax.tree.map(
        lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), meta,
        target)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path, target)


def _path_name(path) -> str:
  return '.'.join(str(getattr(k, 'key', k)) for k in path)


def check_tree(found: Any, expected: Any, what: str) -> None:
  """Raises CheckpointError naming the first leaf whose shape/dtype differs.

  Both trees hold objects with `.shape` and `.dtype` (arrays, ShapeDtypeStruct
  or orbax ArrayMetadata).
  """
  flat_f = {_path_name(p): x for p, x in
            jax.tree_util.tree_leaves_with_path(found)}
  flat_e = {_path_name(p): x for p, x in
            jax.tree_util.tree_leaves_with_path(expected)}
  missing = sorted(set(flat_e) - set(flat_f))
  if missing:
    raise CheckpointError(f'{what}: missing param {missing[0]} '
                          f'({len(missing)} missing in all)')
  extra = sorted(set(flat_f) - set(flat_e))
  if extra:
    raise CheckpointError(f'{what}: unexpected param {extra[0]} '
                          f'({len(extra)} unexpected in all)')
  for name, e in flat_e.items():
    f = flat_f[name]
    if tuple(f.shape) != tuple(e.shape) or np.dtype(f.dtype) != np.dtype(
        e.dtype):
      raise CheckpointError(
          f'{what}: param {name} is {tuple(f.shape)} {np.dtype(f.dtype)}, '
          f'expected {tuple(e.shape)} {np.dtype(e.dtype)}')


def save_params_dir(params_dir: str, params: Any, cfg: ModelConfig, *,
                    tokenizer_dir: str | None = None,
                    hf_config: dict[str, Any] | None = None,
                    meta: dict[str, Any] | None = None,
                    overwrite: bool = False,
                    follow_symlinks: bool = False) -> None:
  """Writes a params dir (see module docstring) atomically.

  `cfg.param_dtype` is set from the params, so the saved config describes
  the saved leaves exactly. `follow_symlinks` lets tokenizer files that are
  symlinks out of `tokenizer_dir` be copied.

  Raises:
    CheckpointError naming the first leaf that does not match `cfg`.
    OutputError (a FileExistsError) when `params_dir` exists and
    `overwrite` is False, or is not an act-jax params dir.
  """
  dtype = np.dtype(jax.tree.leaves(params)[0].dtype).name
  cfg = cfg.replace(param_dtype=dtype)
  check_tree(params, forward.abstract_params(cfg), f'params for {params_dir}')
  with atomic.atomic_dir(params_dir, overwrite, kind='params') as tmp:
    if distributed.is_primary():
      with open(os.path.join(tmp, MODEL_CONFIG), 'w') as f:
        f.write(cfg.to_json() + '\n')
      if hf_config is not None:
        _write_json(os.path.join(tmp, HF_CONFIG), hf_config)
      _write_json(os.path.join(tmp, META), dict(meta or {}))
      copy_aux_files(tokenizer_dir, tmp, follow_symlinks)
    save_pytree(os.path.join(tmp, PARAMS), params)
  logging.info('saved %d params (%s) to %s', forward.count_params(params),
               dtype, params_dir)


def load_model_config(params_dir: str) -> ModelConfig:
  """The ModelConfig saved in `params_dir/model_config.json`."""
  path = os.path.join(params_dir, MODEL_CONFIG)
  return ModelConfig.from_dict(_read_json(path), source=path)


def load_hf_config_dict(params_dir: str) -> dict[str, Any] | None:
  """The source HF config saved beside the params, or None."""
  path = os.path.join(params_dir, HF_CONFIG)
  return _read_json(path) if os.path.isfile(path) else None


def load_params_dir(params_dir: str, *, mesh: jax.sharding.Mesh | None = None,
                    rules=sharding.DEFAULT_RULES,
                    param_dtype: str | None = None,
                    follow_symlinks: bool = False) -> tuple[ModelConfig, Any]:
  """Restores `(cfg, params)` from a params dir, onto `mesh` if given.

  Every leaf's shape and dtype is checked against the saved model_config
  before data is read. `param_dtype` casts after restoring.

  Raises:
    CheckpointError naming the file or the first mismatching leaf;
    UnsafeInputError naming a file that is a symlink out of `params_dir`
    (unless `follow_symlinks`).
  """
  for name in [MODEL_CONFIG] + inputs.tree_files(params_dir, PARAMS):
    inputs.resolve_inside(params_dir, name, follow_symlinks)
  cfg = load_model_config(params_dir)
  abstract = forward.abstract_params(cfg)
  ckpt = os.path.join(params_dir, PARAMS)
  check_tree(pytree_metadata(ckpt), abstract, ckpt)
  if mesh is not None:
    shardings = sharding.tree_shardings(mesh, forward.logical_axes(cfg),
                                        abstract, rules)
  else:
    dev = sharding.single_device()
    shardings = jax.tree.map(lambda _: dev, abstract)
  params = restore_pytree(ckpt, shardings)
  if param_dtype and param_dtype != cfg.param_dtype:
    params = jax.tree.map(lambda x: x.astype(param_dtype), params)
    cfg = cfg.replace(param_dtype=param_dtype)
  return cfg, params
