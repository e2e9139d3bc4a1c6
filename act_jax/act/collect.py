"""Activation statistics of K related models: one vmapped, sharded forward.

`collect_stats` runs all stacked models on the same probe batches inside one
`jax.jit`-compiled step (`forward.apply_models` with in-graph capture,
pairwise when K >= 2, no logits) and adds each batch's per-channel sums into
float32 accumulators that stay on device, replicated (they are small; only
statistics are ever gathered, never weights). The batch is sharded over
('data', 'fsdp') by the 'batch' rule, weights per `forward.logical_axes`
with a leading 'models' axis. Every `save_every` batches the accumulators
and the batch position are saved with orbax, with a fingerprint of the run
and the content fingerprints of its inputs (models, probe file); a rerun
resumes from the last save and ends with the same totals, or, when an input
changed since, fails naming it (`inputs.InputChangedError`). Under
jax.distributed every process feeds its own contiguous slice of batches into
global arrays, so the sums are global. When K models do not fit at once,
`models_per_pass=2` runs every pair separately and combines them (K(K-1)/2
passes). `attribution=True` adds the attribution statistics
(act/attribution.py) from one extra backward in the same step.
The CLI (`python -m act_jax.collect`) and the pipeline's collect stage both
call `collect_stats`.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import time
from typing import Any, Iterable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from act_jax.act import attribution as attribution_lib
from act_jax.io import atomic
from act_jax.io import faults
from act_jax.io import inputs as inputs_lib
from act_jax.model import capture as capture_lib
from act_jax.model import forward
from act_jax.model import sharding
from act_jax.model.config import ModelConfig

Batch = dict[str, np.ndarray]
BATCH_KEYS = _KEYS = ('tokens_bt', 'attention_mask_bt', 'token_mask_bt', 'positions_bt',
         'segment_ids_bt')


def _is_stacked(params, cfg: ModelConfig) -> bool:
  emb = params['embed_tokens']['embedding']
  return emb.ndim == forward.abstract_params(cfg)['embed_tokens'][
      'embedding'].ndim + 1


def accumulator_shapes(cfg: ModelConfig, spec: capture_lib.CaptureSpec,
                       num_models: int,
                       attribution: bool = False) -> dict[str, Any]:
  """ShapeDtypeStructs of the device accumulators (apply_models layout;
  `attribution` adds `pair_attribution`, act/attribution.py)."""
  m, l = num_models, cfg.num_layers
  tree: dict[str, Any] = {}
  for site in spec.sites:
    c = capture_lib.site_channels(cfg, site)
    tree[site] = {s: jax.ShapeDtypeStruct((m, l, c), jnp.float32)
                  for s in capture_lib.STAT_NAMES}
    if spec.pairwise:
      tree[site]['pair_abs_diff'] = jax.ShapeDtypeStruct((m, l, m, c),
                                                         jnp.float32)
    if attribution:
      tree[site][attribution_lib.STAT] = jax.ShapeDtypeStruct((m, l, m, c),
                                                              jnp.float32)
  tree['count'] = jax.ShapeDtypeStruct((m,), jnp.int32)
  return tree


def _accumulate(acc, stats):
  out = jax.tree.map(jnp.add, {k: v for k, v in acc.items() if k != 'count'},
                     {k: v for k, v in stats.items() if k != 'count'})
  out['count'] = acc['count'] + jnp.round(stats['count']).astype(jnp.int32)
  return out


def _host(x: jax.Array) -> np.ndarray:
  """A replicated global array's value on this host (no collective)."""
  return np.asarray(x.addressable_data(0))


def _to_artifact(acc_host: dict[str, Any],
                 spec: capture_lib.CaptureSpec) -> dict[str, np.ndarray]:
  """Flat `<site>/<stat>` arrays; pair_abs_diff [M,L,M,C] -> [M,M,L,C]."""
  flat = {'count': np.asarray(acc_host['count'], np.int64)}
  for site in spec.sites:
    for stat, v in acc_host[site].items():
      v = np.asarray(v, np.float32)
      flat[f'{site}/{stat}'] = (v.transpose(0, 2, 1, 3)
                                if stat.startswith('pair_') else v)
  return flat


def _place(x, sharding_) -> jax.Array:
  """Puts a host-or-device array onto a (possibly multi-process) sharding."""
  if isinstance(x, jax.Array) and x.sharding == sharding_:
    return x
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding_,
                                      lambda idx: host[idx])


class _Checkpointer:
  """Orbax CheckpointManager for (accumulators, batch position)."""

  def __init__(self, ckpt_dir: str, fingerprint: str,
               inputs: dict[str, Any]):
    self._ocp = ocp
    self.fingerprint = fingerprint
    self.inputs = inputs
    self.mgr = ocp.CheckpointManager(
        os.path.abspath(ckpt_dir),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))

  def restore(self, abstract_acc) -> tuple[int, Any] | None:
    step = self.mgr.latest_step()
    if step is None:
      return None
    ocp = self._ocp
    got = self.mgr.restore(step, args=ocp.args.Composite(
        acc=ocp.args.StandardRestore(abstract_acc),
        meta=ocp.args.JsonRestore()))
    where = self.mgr.directory
    changed = inputs_lib.first_change(got['meta'].get('inputs', {}),
                                      self.inputs)
    if changed:
      raise inputs_lib.InputChangedError(
          f'{changed} changed since the interrupted run (checkpoint '
          f'{where}); {inputs_lib.RESTART_HINT}')
    if got['meta']['fingerprint'] != self.fingerprint:
      raise inputs_lib.InputChangedError(
          f'{where}: the checkpoint belongs to a different run (models, '
          f'probe, shapes or sites differ); {inputs_lib.RESTART_HINT}')
    return int(got['meta']['batch']), got['acc']

  def save(self, batch: int, acc) -> None:
    ocp = self._ocp
    self.mgr.save(batch, args=ocp.args.Composite(
        acc=ocp.args.StandardSave(acc),
        meta=ocp.args.JsonSave({'batch': batch,
                                'fingerprint': self.fingerprint,
                                'inputs': self.inputs})))
    faults.failpoint('checkpoint.saved')

  def close(self) -> None:
    self.mgr.wait_until_finished()
    self.mgr.close()


def _fingerprint(cfg, spec, num_models, global_shape, num_batches, extra,
                 attribution=False):
  blob = json.dumps([cfg.to_dict(), spec.sites, spec.pairwise, num_models,
                     global_shape, num_batches, jax.process_count(), extra]
                    + ([attribution] if attribution else []),
                    sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=16)
def compiled_step(cfg: ModelConfig, spec: capture_lib.CaptureSpec,
                  mesh: jax.sharding.Mesh, rules, num_models: int,
                  global_shape: tuple[int, int], attribution: bool = False):
  """The jitted statistics step and its shardings (cached: reruns do not
  recompile): `(step, zeros, param_sh, batch_sh, acc_sh, acc_shapes)`.

  `step(acc, stacked_params, batch)` adds one global `[B, T]` batch's sums
  (batch keys `BATCH_KEYS`; params stacked layer-major,
  `forward.stack_params(..., layer_major=True)`) into the accumulators;
  with `attribution`, one extra backward adds `pair_attribution`. Public so
  a plan can lower and compile it ahead of time (benchmarks/plan_7b.py).
  """
  abstract = jax.eval_shape(
      lambda p: forward.stack_params([p] * num_models, layer_major=True),
      forward.abstract_params(cfg))
  param_sh = sharding.tree_shardings(
      mesh, forward.stacked_logical_axes(cfg, layer_major=True), abstract,
      rules)
  rep = sharding.replicated(mesh)
  shapes = accumulator_shapes(cfg, spec, num_models, attribution)
  acc_sh = jax.tree.map(lambda _: rep, shapes)
  batch_sh = sharding.named_sharding(mesh, ('batch', 'length'), global_shape,
                                     rules)

  def step(acc, params, batch):
    if attribution:  # the same forward plus one backward (the taps' grads)
      with sharding.activation_sharding(mesh, rules):
        stats = attribution_lib.attribution_stats(params, batch, cfg, spec,
                                                  layer_major=True)
      return _accumulate(acc, stats)
    with sharding.activation_sharding(mesh, rules):
      out = forward.apply_models(
          params, batch['tokens_bt'], cfg, layer_major=True,
          attention_mask_bt=batch['attention_mask_bt'],
          positions_bt=batch['positions_bt'],
          token_mask_bt=batch['token_mask_bt'],
          segment_ids_bt=batch['segment_ids_bt'], capture=spec,
          compute_logits=False)
    return _accumulate(acc, out.stats)

  step_fn = jax.jit(step, in_shardings=(acc_sh, param_sh,
                                        {k: batch_sh for k in _KEYS}),
                    out_shardings=acc_sh, donate_argnums=0)
  zeros = jax.jit(lambda: jax.tree.map(
      lambda s: jnp.zeros(s.shape, s.dtype), shapes), out_shardings=acc_sh)
  return step_fn, zeros, param_sh, batch_sh, acc_sh, shapes


def _run_pass(stacked, cfg, batches, spec, mesh, rules, ckpt_dir, save_every,
              num_batches, fingerprint, throttle_s, log_every_s, inputs,
              attribution=False):
  """One pass over the local batches for one stack of models (layer-major
  stacked params, see forward.stack_params)."""
  num_models = stacked['embed_tokens']['embedding'].shape[0]
  it = iter(batches)
  first = next(it, None)
  if first is None:
    raise ValueError('collect_stats: no probe batches')
  local_b, seq = first['tokens_bt'].shape
  global_shape = (local_b * jax.process_count(), seq)
  step_fn, zeros, param_sh, batch_sh, acc_sh, shapes = compiled_step(
      cfg, spec, mesh, tuple(rules), num_models, global_shape, attribution)
  stacked = jax.tree.map(_place, stacked, param_sh)
  inputs = json.loads(json.dumps(dict(inputs or {}), sort_keys=True,
                                 default=str))
  fp = _fingerprint(cfg, spec, num_models, global_shape, num_batches,
                    [fingerprint, inputs], attribution)

  ckpt = _Checkpointer(ckpt_dir, fp, inputs) if ckpt_dir else None
  start, acc = 0, None
  if ckpt is not None:
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        shapes, acc_sh)
    got = ckpt.restore(abstract)
    if got is not None:
      start, acc = got
      logging.info('resumed from batch %d of %s (%s)', start, num_batches,
                   ckpt_dir)
  if acc is None:
    acc = zeros()

  t0, last_log, tokens, done = time.time(), 0.0, 0, 0
  for i, batch in enumerate(itertools.chain([first], it)):
    if i < start:
      continue
    batch = dict(batch)
    batch.setdefault('segment_ids_bt', batch['attention_mask_bt'])
    gbatch = {k: jax.make_array_from_process_local_data(
        batch_sh, np.asarray(batch[k], np.int32), global_shape)
              for k in _KEYS}
    acc = step_fn(acc, stacked, gbatch)
    done += 1
    tokens += int(np.sum(batch['attention_mask_bt'])) * jax.process_count()
    if ckpt is not None and save_every and (i + 1) % save_every == 0:
      ckpt.save(i + 1, acc)
    now = time.time()
    if now - last_log >= log_every_s or (num_batches and i + 1 ==
                                         num_batches):
      jax.block_until_ready(acc)
      now, last_log = time.time(), time.time()
      rate = tokens / max(now - t0, 1e-9)
      eta = ((num_batches - i - 1) * (now - t0) / done
             if num_batches else float('nan'))
      logging.info('collect: batch %d/%s, %d models, %.0f tokens/s, '
                   'ETA %.0fs', i + 1, num_batches or '?', num_models,
                   rate, eta)
    if throttle_s:
      time.sleep(throttle_s)
  acc_host = jax.tree.map(_host, acc)
  if ckpt is not None:
    ckpt.close()
  return acc_host


def collect_stats(params: Sequence[Any] | Any,
                  cfg: ModelConfig,
                  batches: Iterable[Batch],
                  spec: capture_lib.CaptureSpec | None = None,
                  *,
                  mesh: jax.sharding.Mesh | None = None,
                  rules=sharding.DEFAULT_RULES,
                  ckpt_dir: str | None = None,
                  save_every: int = 50,
                  num_batches: int | None = None,
                  models_per_pass: int = 0,
                  fingerprint: Any = None,
                  inputs: dict[str, Any] | None = None,
                  throttle_s: float = 0.0,
                  log_every_s: float = 30.0,
                  attribution: bool = False) -> dict[str, np.ndarray]:
  """Accumulates activation statistics of related models over `batches`.

  Args:
    params: a list of K param trees, or one stacked tree (leading [K]).
    cfg: their common ModelConfig (cfg.dtype is the compute dtype).
    batches: this process's batches (data.local_batches), each a dict of
      int32 `[B, T]` numpy arrays (tokens_bt, attention_mask_bt,
      token_mask_bt, positions_bt). Must be re-iterable if models_per_pass.
    spec: sites to capture (default OUTPUT_SITES); pairwise is set from K.
    mesh: device mesh (default: all devices on 'data').
    rules: logical axis rules; add ('models', 'tensor') etc. to shard the
      models axis when the K models do not fit one device.
    ckpt_dir: orbax directory for resumable runs (None: no checkpoints).
    save_every: save accumulators every this many batches.
    num_batches: number of batches (for ETA; defaults to len(batches)).
    models_per_pass: 0 = all K at once; 2 = every pair in its own pass,
      combined (for K models that do not fit together).
    fingerprint: anything JSON-able identifying the run (checked on resume).
    inputs: `{path: content fingerprint}` of the files the run reads
      (`io.models.model_fingerprint`, `io.inputs.data_fingerprint`); a
      resume from a checkpoint whose inputs differ raises InputChangedError
      naming the first changed file.
    throttle_s: sleep after each batch (tests; sharing a busy machine).
    log_every_s: progress log interval.
    attribution: also `pair_attribution` (K >= 2; act/attribution.py): one
      extra backward per batch.

  Returns:
    Flat host arrays in the artifact layout: `<site>/sum|sum_abs|sum_sq`
    `[K, L, C]` float32, `<site>/pair_abs_diff` `[K, K, L, C]` (K >= 2),
    `<site>/pair_attribution` `[K, K, L, C]` (attribution), `count [K]`
    int64. Identical on every process.
  """
  spec = spec or capture_lib.CaptureSpec()
  if mesh is None:
    mesh = sharding.make_mesh()
  if num_batches is None and hasattr(batches, '__len__'):
    num_batches = len(batches)  # type: ignore[arg-type]
  if isinstance(params, (list, tuple)):
    models = list(params)
    stacked = None
  elif _is_stacked(params, cfg):
    models, stacked = None, params
  else:
    models, stacked = [params], None
  k = len(models) if models is not None else jax.tree.leaves(stacked)[
      0].shape[0]
  if attribution and k < 2:
    raise ValueError('collect_stats(attribution=True) needs two or more '
                     'models (the activation difference of a pair)')
  kw = dict(mesh=mesh, rules=rules, save_every=save_every,
            num_batches=num_batches, throttle_s=throttle_s,
            log_every_s=log_every_s, inputs=inputs, attribution=attribution)
  if not models_per_pass or models_per_pass >= k:
    if stacked is None:
      stacked = forward.stack_params(models, layer_major=True)
    else:  # one on-device copy per run, not one transpose per batch
      stacked = forward.to_layer_major(stacked)
    spec_k = capture_lib.CaptureSpec(spec.sites, pairwise=k >= 2)
    acc = _run_pass(stacked, cfg, batches, spec_k, ckpt_dir=ckpt_dir,
                    fingerprint=fingerprint, **kw)
    return _to_artifact(acc, spec_k)
  if models_per_pass != 2:
    raise ValueError(f'models_per_pass={models_per_pass}: only 0 (all) and 2 '
                     '(pairs) are implemented')
  if not isinstance(batches, Sequence):
    raise ValueError('models_per_pass=2 needs a re-iterable batch list')
  if models is None:
    models = [forward.unstack_params(stacked, i) for i in range(k)]
  pair_spec = capture_lib.CaptureSpec(spec.sites, pairwise=True)
  out: dict[str, np.ndarray] = {}
  for i, j in itertools.combinations(range(k), 2):
    sub = os.path.join(ckpt_dir, f'pair{i}-{j}') if ckpt_dir else None
    acc = _to_artifact(
        _run_pass(forward.stack_params([models[i], models[j]],
                                       layer_major=True), cfg, batches,
                  pair_spec, ckpt_dir=sub,
                  fingerprint=[fingerprint, i, j], **kw), pair_spec)
    if not out:
      out = {key: np.zeros((k,) + v.shape[1:] if 'pair' not in key else
                           (k, k) + v.shape[2:], v.dtype)
             for key, v in acc.items()}
    for key, v in acc.items():
      if key.rsplit('/', 1)[-1].startswith('pair_'):
        out[key][i, j], out[key][j, i] = v[0, 1], v[1, 0]
      else:  # per-model stats: the first pass holding a model sets them
        out[key][i], out[key][j] = v[0], v[1]
  return out
