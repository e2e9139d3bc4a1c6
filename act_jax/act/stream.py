"""Out-of-core transfer and merge: HF checkpoints in, an HF checkpoint out.

`transfer_checkpoints(method, target_dir, source_dirs, out_dir, ...)` never
holds a model: for each HF tensor of the output it reads that one tensor
from every input's safetensors (memory-mapped, file closed right after),
computes the output tensor and writes it straight to its place in the
output shards (`hf.ShardWriter`, laid out up front). Peak host memory is
about one tensor per input, the result and its float32 temporaries, not a
model (benchmarks/transfer_bench.py measures it against mergekit).

The arithmetic is the in-memory one, applied to one leaf slice at a time
(an HF tensor is one layer of a stacked leaf, in param layout after the
transpose `hf_names` records):
  act              one source: `transfer.transplant` of its channel mask;
                   several: `transfer.plan_merge` once, `apply_merge` per
                   tensor (policy average | max_score | priority)
  linear           one source: `baselines.linear_interpolation(target,
                   source, t)`; several: `baselines.average(sources)`
  task_arithmetic, ties, dare   `baselines.merge_tensor` with the target as
                   the base and the sources' task vectors
So a streamed result equals the in-memory one (tests/stream_test.py).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import jax
import numpy as np
from safetensors import safe_open

from act_jax.act import baselines
from act_jax.act import masks as masks_lib
from act_jax.act import transfer
from act_jax.io import atomic
from act_jax.io import hf
from act_jax.io import hf_names
from act_jax.io import models as models_io
from act_jax.io import params as params_io
from act_jax.model import config as config_lib
from act_jax.model import forward

METHODS = ('act', 'linear', 'task_arithmetic', 'ties', 'dare')
REPORT_FILE = 'act_transfer.json'

# (target tensor, source tensors, HF entry, leaf index) -> output tensor,
# all in param layout.
TensorFn = Callable[[np.ndarray, list[np.ndarray], hf_names.Entry, int], Any]


def _tensor_files(hf_dir: str, cfg, follow_symlinks: bool) -> dict[str, str]:
  """`{hf_key: file}` of a checkpoint, validated against `cfg`."""
  files, key_file = hf.checkpoint_files(hf_dir, follow_symlinks)
  headers = hf.read_headers(files)
  where = os.path.join(hf_dir, hf.INDEX_FILE if key_file else
                       hf.SINGLE_FILE)
  hf.validate_checkpoint(cfg, headers, key_file, where)
  return {k: v[0] for k, v in headers.items()}


def _read(file: str, key: str, transpose: bool) -> np.ndarray:
  with safe_open(file, framework='numpy') as f:
    t = f.get_tensor(key)
  return t.T if transpose else t


def _leaf_indices(cfg) -> dict[tuple[str, ...], int]:
  """Each leaf's index in the flattened param tree (DARE's draws)."""
  flat = jax.tree_util.tree_leaves_with_path(forward.abstract_params(cfg))
  return {tuple(getattr(k, 'key', k) for k in path): j
          for j, (path, _) in enumerate(flat)}


def stream_tensors(target_dir: str, source_dirs: Sequence[str],
                   out_dir: str, fn: TensorFn, *,
                   report: Mapping[str, Any] | None = None,
                   max_shard_bytes: int = 2**30,
                   overwrite: bool = False,
                   follow_symlinks: bool = False) -> None:
  """Writes the HF checkpoint `out_dir` whose every tensor is `fn` of the
  target's and the sources' same tensor, one tensor at a time.

  The output keeps the target's dtype, config.json (rebuilt from its
  ModelConfig on top of it), tokenizer files; `report` goes to
  `act_transfer.json`. Input files that are symlinks out of their
  checkpoint are refused unless `follow_symlinks` (`io.inputs`).

  Raises:
    ModelDirError / ConversionError naming the checkpoint before any tensor
    is read: a missing or corrupt file, another architecture or tokenizer.
  """
  dirs = [target_dir] + list(source_dirs)
  follow = follow_symlinks
  models_io.check_related(dirs, follow_symlinks=follow)
  hf_cfg = hf.read_hf_config_dict(target_dir, follow)
  cfg = hf.load_hf_config(target_dir,
                          param_dtype=hf.checkpoint_dtype(hf_cfg),
                          follow_symlinks=follow)
  files = [_tensor_files(d, cfg, follow) for d in dirs]
  entries = list(hf_names.hf_entries(cfg))
  index = _leaf_indices(cfg)
  dtype = hf.tensor_dtype(files[0][entries[0].hf_key], entries[0].hf_key)
  cfg = cfg.replace(param_dtype=dtype.name)
  specs = hf.hf_tensor_specs(cfg, dtype)
  try:
    config = config_lib.to_hf_config(cfg, hf_cfg, dtype.name)
  except config_lib.ConfigError as e:
    raise hf.ConversionError(str(e)) from None
  start = time.time()
  with atomic.atomic_dir(out_dir, overwrite, collective=False, kind='hf') as tmp:
    writer = hf.ShardWriter(tmp, specs, max_shard_bytes)
    for n, e in enumerate(entries, start=1):
      t, *ss = [_read(fs[e.hf_key], e.hf_key, e.transpose) for fs in files]
      out = np.asarray(fn(t, ss, e, index[e.path])).astype(dtype, copy=False)
      writer.write(e.hf_key, out.T if e.transpose else out)
      del t, ss, out
      logging.log_every_n_seconds(logging.INFO, 'stream: %d/%d tensors', 10,
                                  n, len(entries))
    writer.close()
    atomic.write_json(os.path.join(tmp, 'config.json'), config)
    params_io.copy_aux_files(target_dir, tmp, follow)
    atomic.write_json(os.path.join(tmp, REPORT_FILE), dict(report or {}))
  logging.info('streamed %d tensors from %d checkpoints into %s in %.1f s',
               len(entries), len(dirs), out_dir, time.time() - start)


def _act_fn(cfg, masks: Sequence[masks_lib.Mask], *, alpha: float,
            include: Sequence[str], policy: str, scores, names, priority
            ) -> tuple[TensorFn, dict[str, Any]]:
  abstract = forward.abstract_params(cfg)
  if len(masks) == 1:
    tree = masks_lib.leaf_masks(masks[0], abstract, include=include)

    def one(t, ss, e, j):
      del j
      return transfer.transplant(t, ss[0],
                                 transfer.leaf_slice(tree, e.path, e.layer),
                                 alpha)

    return one, {'channels': masks_lib.count(masks[0])}
  plan = transfer.plan_merge(abstract, masks, scores, policy, alpha,
                             names=names, priority=priority, include=include)

  def many(t, ss, e, j):
    del j
    return transfer.apply_merge(plan.slice_leaf(e.path, e.layer), t, ss)

  return many, {'merge_report': plan.report}


def transfer_checkpoints(method: str, target_dir: str,
                         source_dirs: Sequence[str], out_dir: str, *,
                         masks: Sequence[masks_lib.Mask] = (),
                         scores: Sequence[Mapping[str, np.ndarray]] | None
                         = None, policy: str = 'average', alpha: float = 1.0,
                         include: Sequence[str] = (),
                         names: Sequence[str] | None = None,
                         priority: Sequence[int] | None = None,
                         interp_t: float = 0.5, lam: float = 1.0,
                         density: float = 0.2, drop: float = 0.9,
                         seed: int = 0, combine: str = 'task_arithmetic',
                         meta: Mapping[str, Any] | None = None,
                         max_shard_bytes: int = 2**30,
                         overwrite: bool = False,
                         follow_symlinks: bool = False) -> dict[str, Any]:
  """Out of core: `method` of the target and the sources -> HF `out_dir`.

  Args:
    method: one of `METHODS` (see the module docstring).
    target_dir: HF checkpoint receiving the channels; the base of a merge.
    source_dirs: HF checkpoints, one mask each for method 'act'.
    masks: method 'act': one channel mask `{site: [L, C]}` per source
      (coupled to units already).
    scores, policy, alpha, include, names, priority: as `transfer.merge`.
    interp_t: linear with one source: (1 - t) target + t source.
    lam, density, drop, seed, combine: as `baselines.task_arithmetic`,
      `ties`, `dare` (`lam` for all three, `density` for TIES only).
    meta: extra provenance for `act_transfer.json`.
    max_shard_bytes, overwrite, follow_symlinks: as `stream_tensors`.

  Returns:
    The report written to `out_dir/act_transfer.json`.
  """
  if method not in METHODS:
    raise transfer.TransferError(f'--method={method!r}: one of '
                                 f'{", ".join(METHODS)}')
  if not source_dirs:
    raise transfer.TransferError('no source checkpoints given')
  cfg = models_io.load_config(target_dir, follow_symlinks)
  report: dict[str, Any] = dict(meta or {}, method=method)
  if method == 'act':
    if len(masks) != len(source_dirs):
      raise transfer.TransferError(f'{len(masks)} masks for '
                                   f'{len(source_dirs)} sources')
    fn, extra = _act_fn(cfg, masks, alpha=alpha, include=include,
                        policy=policy, scores=scores, names=names,
                        priority=priority)
    report.update(extra)
  elif method == 'linear':
    if len(source_dirs) == 1:
      fn = lambda t, ss, e, j: baselines.linear_interpolation(t, ss[0],
                                                              interp_t)
      report['interp_t'] = interp_t
    else:
      fn = lambda t, ss, e, j: baselines.average(ss)
  else:
    # `density` trims TIES only; DARE drops instead (as `baselines.dare`).
    kw = dict(lam=lam, density=density if method == 'ties' else 1.0,
              drop=drop, seed=seed, combine=combine)
    report.update(kw)

    def fn(t, ss, e, j):
      return baselines.merge_tensor(method, t, ss, leaf_index=j,
                                    layer=e.layer, **kw)

  stream_tensors(target_dir, source_dirs, out_dir, fn, report=report,
                 max_shard_bytes=max_shard_bytes, overwrite=overwrite,
                 follow_symlinks=follow_symlinks)
  return report
