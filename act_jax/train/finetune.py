"""Masked fine-tuning loop (also full training from scratch for the toy demo).

`finetune(train_cfg, params, cfg, batches, mask=, mesh=, workdir=)`:
  - one jitted, sharded step: params per `forward.logical_axes`, the batch
    over ('data', 'fsdp'), optimizer state following its params;
  - loss = mean next-token cross-entropy over loss-mask targets (float32),
    gradient accumulation by an in-step `lax.scan` over micro-batches (the
    exact full-batch gradient; no extra optimizer state); weight gradients
    only for trainable slices and none for frozen leaves (see optim.py);
  - orbax checkpoints every `save_every` steps (params, opt state, step, data
    position, rng) in `workdir/checkpoints`; a rerun resumes from the latest
    one and, since the data order is a function of the step, ends with the
    same params as an uninterrupted run. It resumes only what it started:
    `workdir/train_config.json` records every train field that changes the
    result and `workdir/inputs.json` digests of the start params, the mask,
    the batches and the caller's `fingerprint`; a rerun with other values
    fails naming the field or input (`inputs.InputChangedError`);
  - a non-finite loss or gradient leaves the state untouched (selected
    in-graph), stops the run with `TrainingDivergedError` and never saves
    the bad state: the last good checkpoint stays the latest;
  - metrics: `workdir/metrics.jsonl` per logged step, TensorBoard events in
    `workdir/tb`, console progress with rate and ETA.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from act_jax import distributed
from act_jax.act import masks as masks_lib
from act_jax.io import atomic
from act_jax.io import faults
from act_jax.io import inputs as inputs_lib
from act_jax.model import forward
from act_jax.model import losses
from act_jax.train import metrics as train_metrics
from act_jax.train import optim
from act_jax.model import sharding
from act_jax.model.config import ModelConfig

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The `train` sub-config (also accepted as an ml_collections ConfigDict)."""

  num_steps: int = 200  # optimizer steps (one update per step)
  lr: float = 1e-5  # peak learning rate (AdamW), per step
  warmup_frac: float = 0.03  # fraction of num_steps of linear warmup from 0
  schedule: str = 'cosine'  # decay after warmup: cosine | linear | constant
  final_lr_frac: float = 0.0  # cosine/linear decay ends at this * lr
  weight_decay: float = 0.0  # decoupled AdamW weight decay, per step * lr
  clip_norm: float = 1.0  # global gradient-norm clip (0 = off)
  grad_accum: int = 1  # micro-batches per step (batch_size % grad_accum == 0)
  batch_size: int = 8  # sequences per optimizer step (global, all devices)
  max_seq_len: int = 128  # T, tokens per sequence
  overlength: str = 'error'  # batches longer than max_seq_len: error|truncate
  scope: str = 'channels'  # what moves: channels | modules | full
  lean: bool = False  # channels only: Adam state just for selected slices
  save_every: int = 50  # checkpoint every N steps (and at the end); 0 = end
  keep_checkpoints: int = 2  # checkpoints kept on disk
  seed: int = 0  # rng seed (saved in checkpoints; data order is by step)
  log_every: int = 10  # console progress every N steps (JSONL every step)
  compute_dtype: str = 'float32'  # forward dtype; params stay as given
  remat: str = 'none'  # backward memory: none | dots | full (REMAT_POLICIES)
  b1: float = 0.9  # Adam beta1
  b2: float = 0.999  # Adam beta2
  eps: float = 1e-8  # Adam epsilon


FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def default_train_config() -> ml_collections.ConfigDict:
  """TrainConfig's defaults as a ConfigDict (for configs/*.py)."""
  return ml_collections.ConfigDict(dataclasses.asdict(TrainConfig()))


def check_train_config(train_cfg) -> TrainConfig:
  """A TrainConfig from a dataclass or ConfigDict; errors name the field."""
  if isinstance(train_cfg, TrainConfig):
    values = dataclasses.asdict(train_cfg)
  else:
    values = dict(train_cfg.items() if hasattr(train_cfg, 'items')
                  else vars(train_cfg))
  unknown = sorted(set(values) - set(FIELDS))
  if unknown:
    raise ValueError(f'train config: unknown fields {unknown}; known: '
                     f'{list(FIELDS)}')
  tc = TrainConfig(**values)
  checks = [
      (tc.num_steps > 0, 'num_steps must be > 0'),
      (tc.lr >= 0, 'lr must be >= 0'),
      (0 <= tc.warmup_frac < 1, 'warmup_frac must be in [0, 1)'),
      (0 <= tc.final_lr_frac <= 1, 'final_lr_frac must be in [0, 1]'),
      (tc.grad_accum >= 1, 'grad_accum must be >= 1'),
      (tc.batch_size % tc.grad_accum == 0,
       f'batch_size={tc.batch_size} is not a multiple of grad_accum='
       f'{tc.grad_accum}'),
      (tc.overlength in ('error', 'truncate'),
       f"overlength={tc.overlength!r}: expected 'error' or 'truncate'"),
      (tc.compute_dtype in ('float32', 'bfloat16'),
       f'compute_dtype={tc.compute_dtype!r}: expected float32 or bfloat16'),
      (tc.save_every >= 0, 'save_every must be >= 0'),
      (tc.remat in ('none', 'dots', 'full'),
       f"remat={tc.remat!r}: expected 'none', 'dots' or 'full'"),
  ]
  for ok, msg in checks:
    if not ok:
      raise ValueError(f'train.{msg}')
  return tc


class TrainingDivergedError(RuntimeError):
  """The loss or gradient became NaN/inf; the bad step was not applied."""


# ------------------------------------------------------------------ data


class BatchSource:
  """Deterministic batch-by-step access over the accepted batch inputs.

  `batches` may be a callable `step -> batch`, a sequence (step i reads
  `batches[i % len]`, i.e. epochs in order) or an iterable (consumed in
  order; on resume the first `step` items are skipped).
  """

  def __init__(self, batches, train_cfg: TrainConfig, vocab_size: int):
    self._tc = train_cfg
    self._vocab = vocab_size
    self._fn = self._seq = self._it = None
    self.num_truncated = 0
    if callable(batches):
      self._fn = batches
    elif isinstance(batches, Sequence):
      if len(batches) == 0:
        raise ValueError('the fine-tune set is empty: no batches given')
      self._seq = batches
    elif isinstance(batches, Iterable):
      self._it = iter(batches)
      self._pos = 0
    else:
      raise TypeError(f'batches must be a callable, sequence or iterable, '
                      f'got {type(batches).__name__}')

  def get(self, step: int) -> dict[str, np.ndarray]:
    if self._fn is not None:
      raw = self._fn(step)
    elif self._seq is not None:
      raw = self._seq[step % len(self._seq)]
    else:
      while self._pos <= step:
        try:
          raw = next(self._it)
        except StopIteration:
          if self._pos == 0:
            raise ValueError('the fine-tune set is empty: the batch iterator '
                             'yielded nothing') from None
          raise ValueError(f'the batch iterator ran out at step {step} of '
                           f'{self._tc.num_steps}') from None
        self._pos += 1
    return self._check(losses.as_loss_batch(raw), step)

  def _check(self, batch, step):
    losses.check_batch(batch, f'batch of step {step}')
    tc = self._tc
    b, t = batch['tokens_bt'].shape
    tokens = np.asarray(batch['tokens_bt'])
    if tokens.size and (tokens.min() < 0 or tokens.max() >= self._vocab):
      raise ValueError(f'batch of step {step} has token ids in '
                       f'[{tokens.min()}, {tokens.max()}], outside the '
                       f'vocabulary [0, {self._vocab})')
    if b != tc.batch_size:
      raise ValueError(f'batch of step {step} has {b} rows; '
                       f'train.batch_size={tc.batch_size}')
    if t > tc.max_seq_len:
      over = int(np.sum(np.any(
          np.asarray(batch['attention_mask_bt'])[:, tc.max_seq_len:], -1)))
      if tc.overlength == 'error':
        raise ValueError(
            f'batch of step {step} has length {t} > train.max_seq_len='
            f'{tc.max_seq_len} ({over} sequences longer); set '
            'train.overlength=truncate or a larger max_seq_len')
      self.num_truncated += over
      if over:
        logging.warning('step %d: truncated %d sequences to max_seq_len=%d '
                        '(%d so far)', step, over, tc.max_seq_len,
                        self.num_truncated)
      batch = {k: v[:, :tc.max_seq_len] for k, v in batch.items()}
    return {k: np.asarray(v, np.int32) for k, v in batch.items()}


# ------------------------------------------------------------------ step


def _grad_norm(grads, compact, opt: optim.Optimizer, masks):
  """Global norm of the trainable entries' gradients (dense + slices)."""
  if opt.kinds is None:
    return optax.tree.norm(grads)
  dense = {k: v for k, v in opt.kinds.items()}
  for k in opt.slices:  # their dense leaves hold no gradient
    dense[k] = 'none'
  sq = optax.tree.norm(optim.mask_tree(grads, dense, masks['write']),
                       squared=True)
  if compact:
    sq = sq + optax.tree.norm(compact, squared=True)
  return jnp.sqrt(sq)


def _stop_frozen(params, opt: optim.Optimizer):
  """Params whose frozen leaves (and slice kernels, which get their
  gradients through the probes) carry no gradient: autodiff then never
  builds their weight gradients."""
  if opt.kinds is None:
    return params

  def one(path, x):
    k = optim.path_key(path)
    if opt.kinds[k] == 'none' or k in opt.slices:
      return jax.lax.stop_gradient(x)
    return x

  return jax.tree_util.tree_map_with_path(one, params)


def make_train_step(cfg: ModelConfig, opt: optim.Optimizer, grad_accum: int,
                    compute_dtype: str, remat: str = 'none') -> Callable:
  """`(params, opt_state, batch, step, masks) -> (params, opt_state, metrics)`.

  `masks` is `opt.masks` (the channel set as data, so one compiled step
  serves every channel set of the same structure). Not jitted here (see
  `compiled_step`). Kernels in `opt.slices` get weight gradients only for
  their selected columns/rows (zero probes through `forward.apply(...,
  slices=)`), frozen leaves none at all. A non-finite loss/grad-norm
  returns the input state unchanged with `metrics['ok'] = False`.
  """
  ccfg = cfg.replace(dtype=compute_dtype)

  def step_fn(params, opt_state, batch, step, masks):
    weights = losses.target_weights(batch)
    total = jnp.maximum(jnp.sum(weights), 1.0)
    probes = optim.slice_probes(opt, params, masks) if opt.slices else {}

    def micro_loss(p, pr, mb):
      sl = optim.slices_tree(pr, opt, masks) if opt.slices else None
      s, _ = losses.nll_sum(_stop_frozen(p, opt), mb, ccfg, slices=sl,
                            remat=remat)
      return s / total

    grad_fn = jax.value_and_grad(micro_loss, argnums=(0, 1))
    if grad_accum == 1:
      loss, (grads, compact) = grad_fn(params, probes, batch)
    else:
      # Row r goes to micro-batch r % A, so each device keeps its own rows.
      micro = jax.tree.map(
          lambda x: jnp.swapaxes(
              x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:]),
              0, 1), batch)

      def body(carry, mb):
        l, g = grad_fn(params, probes, mb)
        return jax.tree.map(jnp.add, carry, (l, g)), None

      zero = (jnp.zeros((), jnp.float32),
              jax.tree.map(jnp.zeros_like, (params, probes)))
      (loss, (grads, compact)), _ = jax.lax.scan(body, zero, micro)
    if opt.slices:
      compact = optim.zero_slice_padding(compact, opt, masks)
    grad_norm = _grad_norm(grads, compact, opt, masks)
    updates, new_state = opt.tx.update(grads, opt_state, params, masks=masks,
                                       **({'compact': compact}
                                          if opt.slices else {}))
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_params = opt.apply(params, updates, masks, ok)
    new_state = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_state,
                             opt_state)
    metrics = {'loss': loss, 'grad_norm': grad_norm,
               'lr': jnp.asarray(opt.schedule(step), jnp.float32),
               'tokens': jnp.sum(batch['attention_mask_bt']), 'ok': ok}
    return new_params, new_state, metrics

  return step_fn


def _step_key(tc: TrainConfig) -> TrainConfig:
  """The train fields the compiled step depends on (others zeroed)."""
  return dataclasses.replace(tc, save_every=0, keep_checkpoints=0,
                             log_every=0, seed=0, overlength='error')


_STEPS: dict[Any, Callable] = {}


def compiled_step(cfg: ModelConfig, tc: TrainConfig, opt: optim.Optimizer,
                  mesh, param_sh, state_sh, batch_sh, masks_sh):
  """The jitted train step, built once per (model, train hyperparameters,
  mask structure, shardings) and reused: a sweep over channel sets of one
  structure compiles it once."""
  key = (cfg, _step_key(tc), opt.static, mesh, jax.tree.structure(param_sh),
         tuple(jax.tree.leaves(param_sh)), jax.tree.structure(state_sh),
         tuple(jax.tree.leaves(state_sh)), tuple(sorted(batch_sh.items())),
         jax.tree.structure(masks_sh), tuple(jax.tree.leaves(masks_sh)))
  if key not in _STEPS:
    rep = sharding.replicated(mesh)
    fn = make_train_step(cfg, opt, tc.grad_accum, tc.compute_dtype,
                         tc.remat)

    def step(*args):
      # Activations and weights constrained on the mesh while tracing.
      with sharding.activation_sharding(mesh):
        return fn(*args)

    _STEPS[key] = jax.jit(
        step,
        in_shardings=(param_sh, state_sh, batch_sh, rep, masks_sh),
        out_shardings=(param_sh, state_sh, rep),
        donate_argnums=(0, 1))
  return _STEPS[key]


def train_program(cfg: ModelConfig, tc: TrainConfig, opt: optim.Optimizer,
                  params, mesh, batch_shapes: dict[str, tuple[int, ...]]):
  """The compiled train step and its shardings for `params` (arrays or
  ShapeDtypeStructs) on `mesh`: `(step, (param_sh, state_sh, batch_sh,
  masks_sh))`. What `finetune` runs; public so a plan can lower and compile
  it ahead of time (benchmarks/plan_7b.py)."""
  param_sh = sharding.tree_shardings(mesh, forward.logical_axes(cfg), params)
  state_sh = _state_shardings(mesh, opt.tx, params, param_sh)
  batch_sh = {k: sharding.named_sharding(mesh, ('batch', 'length'), shape)
              for k, shape in batch_shapes.items()}
  rep = sharding.replicated(mesh)
  masks_sh = jax.tree.map(lambda _: rep, opt.masks)
  step = compiled_step(cfg, tc, opt, mesh, param_sh, state_sh, batch_sh,
                       masks_sh)
  return step, (param_sh, state_sh, batch_sh, masks_sh)


def _state_shardings(mesh, tx, params, param_sh):
  """Optimizer-state shardings: a state leaf whose key path ends with a param
  path and has that param's shape (Adam moments, also inside
  multi_transform) follows the param; anything else (counts, lean compact
  slices) is replicated."""
  abstract = jax.eval_shape(tx.init, params)
  rep = sharding.replicated(mesh)
  by_path = {}
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    names = tuple(getattr(k, 'key', None) for k in path)
    by_path[names] = (tuple(x.shape), _leaf_at(param_sh, names))

  def pick(path, x):
    names = tuple(getattr(k, 'key', None) for k in path)
    for i in range(len(names)):
      hit = by_path.get(names[i:])
      if hit is not None and hit[0] == tuple(x.shape):
        return hit[1]
    return rep

  return jax.tree_util.tree_map_with_path(pick, abstract)


def _leaf_at(tree, names):
  for n in names:
    tree = tree[n]
  return tree


# ------------------------------------------------------------ checkpoints


def _manager(workdir: str, tc: TrainConfig) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints'),
      options=ocp.CheckpointManagerOptions(max_to_keep=tc.keep_checkpoints,
                                           create=True))


# Train fields that do not change the trained params (logging, how often
# and how many checkpoints are kept): a resume may change them.
_RESUME_FREE = ('save_every', 'keep_checkpoints', 'log_every')


def _digest_arrays(tree) -> str | None:
  """SHA-256 of a pytree's leaves (paths, dtypes, shapes, bytes), one leaf
  on the host at a time; None when a leaf is not fully addressable here."""
  h = hashlib.sha256()
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    if hasattr(x, 'is_fully_addressable') and not x.is_fully_addressable:
      return None
    a = np.ascontiguousarray(np.asarray(jax.device_get(x)))
    h.update(f'{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|'.encode())
    h.update(a.tobytes())
  return h.hexdigest()


def resume_inputs(params, mask, batches, first,
                  fingerprint: dict[str, Any] | None) -> dict[str, Any]:
  """What a resumed fine-tune must start from: digests of the start params,
  the mask, the batches (all of a sequence; the first of a callable or
  iterator) and the caller's `fingerprint` entries (files it read)."""
  if isinstance(batches, Sequence) and not callable(batches):
    data = _digest_arrays([dict(b) for b in batches])
  else:
    data = _digest_arrays(first)
  out = {'start params': {'digest': _digest_arrays(params)},
         'trainable mask': {'digest': _digest_arrays(mask)},
         'fine-tune batches': {'digest': data}}
  out.update(json.loads(json.dumps(dict(fingerprint or {}), default=str)))
  return out


def _check_resume(workdir: str, tc: TrainConfig,
                  inputs: dict[str, Any]) -> None:
  """Writes train_config.json and inputs.json, or checks that a resumed
  run has the same train fields and inputs."""
  path = os.path.join(workdir, 'train_config.json')
  ipath = os.path.join(workdir, 'inputs.json')
  cur = dataclasses.asdict(tc)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    diff = [k for k in cur if k not in _RESUME_FREE and old.get(k) != cur[k]]
    if diff:
      raise ValueError(f'{path}: resuming with changed train fields {diff} '
                       f'(was {[old.get(k) for k in diff]}, now '
                       f'{[cur[k] for k in diff]}); use a new workdir')
    recorded = atomic.read_json(ipath) if os.path.exists(ipath) else {}
    changed = inputs_lib.first_change(recorded, inputs)
    if changed:
      raise inputs_lib.InputChangedError(
          f'{changed} changed since the interrupted fine-tune in {workdir}; '
          f'{inputs_lib.RESTART_HINT}')
    return
  if distributed.is_primary():  # one writer; every process checks it above
    atomic.write_json(ipath, inputs)
    atomic.write_json(path, cur)


def finetune(train_cfg, params: Params, cfg: ModelConfig, batches, *,
             mask=None, mesh=None, workdir: str | None = None,
             fingerprint: dict[str, Any] | None = None) -> Params:
  """Trains `params` for `train_cfg.num_steps` steps; returns the new params.

  Args:
    train_cfg: TrainConfig or ConfigDict with TrainConfig's fields.
    params: the start params (fp32 master weights; `compute_dtype` only
      changes the forward).
    cfg: the model config.
    batches: callable `step -> batch`, a sequence of batches (cycled), or an
      iterable. A batch is a dict of `[B, T]` int arrays `tokens_bt`,
      `attention_mask_bt`, `loss_mask_bt` (or data.py's `token_mask_bt`).
    mask: bool pytree aligned with params (True = trainable); needed for
      scope channels/modules.
    mesh: device mesh (default: all devices on 'data').
    workdir: checkpoints, metrics.jsonl, tb/; None = no checkpoints/logs.
    fingerprint: `{name: content fingerprint}` of the files the caller
      built params and batches from; with the digests of the start params,
      mask and batches, a resume must match it (InputChangedError).

  Raises:
    ValueError for a bad config, empty data or a bad batch (before
    compiling); InputChangedError when `workdir` holds a fine-tune of other
    inputs; TrainingDivergedError on a non-finite loss.
  """
  tc = check_train_config(train_cfg)
  source = BatchSource(batches, tc, cfg.vocab_size)
  first = source.get(0)  # fail on bad data before any compile
  mesh = mesh or sharding.make_mesh()
  opt = optim.make_optimizer(tc, params, mask)
  step_fn, (param_sh, state_sh, batch_sh, masks_sh) = train_program(
      cfg, tc, opt, params, mesh, {k: x.shape for k, x in first.items()})
  rep = sharding.replicated(mesh)
  masks = jax.device_put(opt.masks, masks_sh)

  # The step donates its params; copy so the caller's arrays stay valid.
  params = jax.device_put(jax.tree.map(jnp.copy, params), param_sh)
  opt_state = jax.jit(opt.tx.init, out_shardings=state_sh)(params)
  # Replicated on the mesh, so a multi-process checkpoint can save it.
  rng = jax.device_put(
      np.asarray(jax.random.key_data(jax.random.key(tc.seed))), rep)
  start = 0
  mgr = None
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    _check_resume(workdir, tc, resume_inputs(params, mask, batches, first,
                                             fingerprint))
    mgr = _manager(workdir, tc)
    latest = mgr.latest_step()
    if latest is not None:
      target = {
          'params': jax.tree.map(
              lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
              params, param_sh),
          'opt_state': jax.tree.map(
              lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
              opt_state, state_sh),
          'rng': jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=rep),
      }
      restored = mgr.restore(latest, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target),
          meta=ocp.args.JsonRestore()))
      params = restored['state']['params']
      opt_state = restored['state']['opt_state']
      rng = restored['state']['rng']
      start = int(restored['meta']['step'])
      logging.info('resumed from %s at step %d', mgr.directory, start)

  # Process 0 logs (metrics are replicated: every process has the same).
  logger = train_metrics.MetricsLogger(
      workdir if distributed.is_primary() else None, tc.num_steps)
  last_time = time.time()

  def settle(done: int, metrics) -> None:
    """Reads step `done`'s metrics (blocking on it alone) and logs them;
    a non-finite step, which the compiled step did not apply, ends the
    run before anything later is saved."""
    nonlocal last_time
    metrics = jax.device_get(metrics)
    if not metrics['ok']:
      good = mgr.latest_step() if mgr else None
      if mgr:
        mgr.wait_until_finished()
      raise TrainingDivergedError(
          f'non-finite loss {float(metrics["loss"])} / grad_norm '
          f'{float(metrics["grad_norm"])} in step {done} of '
          f'{tc.num_steps} (lr '
          f'{float(metrics["lr"]):.3g}); the step was not applied and '
          f'nothing was saved; last good checkpoint: '
          f'{"none" if good is None else f"step {good} in {mgr.directory}"}')
    now = time.time()
    row = {k: v for k, v in metrics.items() if k not in ('ok', 'tokens')}
    row['tokens_per_s'] = float(metrics['tokens']) / max(now - last_time,
                                                         1e-9)
    last_time = now
    logger.log(done, row, console=(done % max(tc.log_every, 1) == 0 or
                                   done == tc.num_steps))

  # The host reads each step's metrics one step late: step n+1's batch is
  # staged and the step queued while step n still runs, so the device
  # never waits on the host. Saves read every earlier step first.
  pending = None
  try:
    for step in range(start, tc.num_steps):
      batch = first if step == 0 else source.get(step)
      # Every process holds the whole batch; each fills its own shards.
      batch = {k: sharding.put(v, batch_sh[k]) for k, v in batch.items()}
      params, opt_state, metrics = step_fn(params, opt_state, batch,
                                           jnp.asarray(step, jnp.int32), masks)
      if pending is not None:
        settle(*pending)
      done, pending = step + 1, (step + 1, metrics)
      if mgr and ((tc.save_every and done % tc.save_every == 0) or
                  done == tc.num_steps):
        settle(*pending)
        pending = None
        mgr.save(done, args=ocp.args.Composite(
            state=ocp.args.StandardSave(
                {'params': params, 'opt_state': opt_state, 'rng': rng}),
            meta=ocp.args.JsonSave({'step': done, 'data_position': done,
                                    'num_truncated': source.num_truncated})))
        faults.failpoint('checkpoint.saved')
    if pending is not None:
      settle(*pending)
  finally:
    logger.close()
    if mgr:
      mgr.wait_until_finished()
      mgr.close()
  return params


def compat_finetune(train_cfg: TrainConfig, params, cfg: ModelConfig,
                    mask: Mapping[str, np.ndarray] | None, batches,
                    workdir: str | None, scope: str | None = None,
                    mesh=None):
  """The compatibility fine-tune of a transplant: `finetune` with only the
  channels of the compact mask `{site: [L, C]}` trainable (or, scope
  'full', the full fine-tune baseline on the same data and steps).

  Args:
    train_cfg: the train config; `scope` overrides its scope (the lean
      state only applies to scope 'channels').
    params, cfg: the start model.
    mask: the transferred channels (None for scope 'full').
    batches, workdir, mesh: as `finetune`.
    scope: None (the config's), 'channels' or 'full'.
  """
  tc = train_cfg
  if scope is not None:
    tc = dataclasses.replace(tc, scope=scope,
                             lean=tc.lean and scope == 'channels')
  tree = None if tc.scope == 'full' else masks_lib.leaf_masks(mask, params)
  return finetune(tc, params, cfg, batches, mask=tree, mesh=mesh,
                  workdir=workdir)
