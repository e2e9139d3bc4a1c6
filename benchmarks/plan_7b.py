"""A measured plan for 7B-class models, without the hardware.

  python benchmarks/plan_7b.py [--models=qwen2.5-7b,llama3-8b] [--devices=8,32]

For Qwen2.5-7B and Llama-3-8B shapes (bf16 params, no weights: abstract
ShapeDtypeStructs on their NamedShardings) this lowers and compiles ahead
of time, on fake CPU meshes of 8 and 32 devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N, one subprocess per
device count), the three programs a run spends its time in, with the mesh
and batch shapes configs/recover.py recommends:
  stats     the K=2 bf16 statistics step (`act.collect.compiled_step`:
            both models stacked, pairwise capture on the 7 output sites)
  finetune  the lean channel fine-tune step (`train.finetune.train_program`,
            scope channels, lean=True, 5% channels per (layer, site),
            bf16 compute)
  evaluate  the scoring forward every metric runs
            (`eval.metrics.scoring_program`)
and prints, per device, the argument, output, temporary and alias (donated)
bytes from each compiled executable's memory analysis, their sum less the
aliases (the resident peak estimate), that peak against the budget (80 GB:
8 x H100/H200; 16 GB: a v5e-32 chip), and FLOPs per token (analytic: 2 x
matmul params + attention scores and values over the T x T square the
decoder computes; x3 for a train step; XLA's cost analysis counts a scanned
layer once, so it is not used). XLA:CPU's buffer assignment is not TPU's
or GPU's: temporaries are an estimate; argument and output bytes are the
sharding's exact shard sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

import bench_common

flags.DEFINE_list('models', ['qwen2.5-7b', 'llama3-8b'], 'Model shapes.')
flags.DEFINE_list('devices', ['8', '32'], 'Fake CPU device counts.')
flags.DEFINE_list('programs', ['stats', 'finetune', 'evaluate'],
                  'Programs to compile.')
flags.DEFINE_integer('child', 0, 'Internal: compile on this many devices.')
FLAGS = flags.FLAGS

GB = 1e9
# configs/recover.py's recommendation per device count: mesh, batch rows
# (statistics, fine-tune, evaluate), tokens per row, budget per device.
PLANS = {
    8: dict(mesh=(1, 8, 1), collect_batch=32, train_batch=32, eval_batch=32,
            seq=1024, budget_gb=80, remat='dots', grad_accum=1,
            where='8 x H100/H200 80 GB'),
    32: dict(mesh=(1, 32, 1), collect_batch=64, train_batch=64, eval_batch=64,
             seq=1024, budget_gb=16, remat='full', grad_accum=1,
             where='v5e-32 (16 GB HBM per chip)'),
}
SHAPES = {
    # A small Llama for the smoke test (tests/benchmarks_test.py).
    'tiny': dict(model_type='llama', vocab_size=512, hidden_size=128,
                 intermediate_size=256, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=32, rope_theta=1e4),
    'qwen2.5-7b': dict(model_type='qwen2', vocab_size=152064,
                       hidden_size=3584, intermediate_size=18944,
                       num_layers=28, num_heads=28, num_kv_heads=4,
                       head_dim=128, qkv_bias=True, rope_theta=1e6),
    'llama3-8b': dict(model_type='llama', vocab_size=128256,
                      hidden_size=4096, intermediate_size=14336,
                      num_layers=32, num_heads=32, num_kv_heads=8,
                      head_dim=128, rope_theta=5e5),
}


def model_config(name: str):
  from act_jax.model import config  # pylint: disable=g-import-not-at-top
  return config.ModelConfig(param_dtype='bfloat16', dtype='bfloat16',
                     max_position_embeddings=8192, **SHAPES[name])


def flops_per_token(cfg, seq: int, logits: bool) -> float:
  """Forward FLOPs per token: 2 x matmul params (+ lm_head) + attention."""
  d, f, l = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  per_layer = d * cfg.q_dim + 2 * d * cfg.kv_dim + cfg.q_dim * d + 3 * d * f
  matmul = l * per_layer + (cfg.vocab_size * d if logits else 0)
  attention = l * 2 * 2 * seq * cfg.q_dim  # scores + values, full T x T
  return 2 * matmul + attention


def _abstract(tree, shardings):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
      shardings)


def compile_program(program: str, cfg, mesh, plan):
  """The compiled executable of one program on abstract inputs."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from act_jax.act import collect  # pylint: disable=g-import-not-at-top
  from act_jax.act import localize  # pylint: disable=g-import-not-at-top
  from act_jax.act import masks as masks_lib  # pylint: disable=g-import-not-at-top,line-too-long
  from act_jax.eval import metrics  # pylint: disable=g-import-not-at-top
  from act_jax.model import capture  # pylint: disable=g-import-not-at-top
  from act_jax.model import forward  # pylint: disable=g-import-not-at-top
  from act_jax.model import losses  # pylint: disable=g-import-not-at-top
  from act_jax.model import sharding  # pylint: disable=g-import-not-at-top
  from act_jax.train import finetune  # pylint: disable=g-import-not-at-top
  from act_jax.train import optim  # pylint: disable=g-import-not-at-top
  seq = plan['seq']
  params = forward.abstract_params(cfg)
  if program == 'stats':
    spec = capture.CaptureSpec(capture.OUTPUT_SITES, pairwise=True)
    shape = (plan['collect_batch'], seq)
    step, _, param_sh, batch_sh, acc_sh, acc = collect.compiled_step(
        cfg, spec, mesh, tuple(sharding.DEFAULT_RULES), 2, shape)
    stacked = jax.eval_shape(
        lambda p: forward.stack_params([p, p], layer_major=True), params)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sh)
             for k in collect.BATCH_KEYS}
    return step.lower(_abstract(acc, acc_sh), _abstract(stacked, param_sh),
                      batch).compile()
  if program == 'finetune':
    tc = finetune.TrainConfig(num_steps=1000, batch_size=plan['train_batch'],
                              max_seq_len=seq, scope='channels', lean=True,
                              compute_dtype='bfloat16', remat=plan['remat'],
                              grad_accum=plan['grad_accum'])
    scores = localize.random_scores(
        {s: v for s, v in masks_lib.site_shapes(cfg).items()
         if s in capture.OUTPUT_SITES}, seed=0)
    mask = localize.select_channels(scores, top_frac=0.05)
    opt = optim.make_optimizer(tc, params, masks_lib.leaf_masks(mask, params))
    shape = (plan['train_batch'], seq)
    keys = losses.REQUIRED_KEYS
    step, (param_sh, state_sh, batch_sh, masks_sh) = finetune.train_program(
        cfg, tc, opt, params, mesh, {k: shape for k in keys})
    state = jax.eval_shape(opt.tx.init, params)
    masks = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        jnp.shape(x), jnp.asarray(x).dtype), opt.masks)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sh[k])
             for k in keys}
    return step.lower(_abstract(params, param_sh), _abstract(state, state_sh),
                      batch, jax.ShapeDtypeStruct((), jnp.int32),
                      _abstract(masks, masks_sh)).compile()
  fn, param_sh, batch_sh = metrics.scoring_program(cfg, mesh)
  shape = (plan['eval_batch'], seq)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sh)
           for k in losses.REQUIRED_KEYS}
  return fn.lower(_abstract(params, param_sh), batch).compile()


def child(num_devices: int) -> None:
  """Compiles every (model, program) on `num_devices`; prints JSON rows."""
  import jax  # pylint: disable=g-import-not-at-top
  from act_jax.model import sharding  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == num_devices, jax.device_count()
  plan = PLANS[num_devices]
  mesh = sharding.make_mesh(plan['mesh'])
  for name in FLAGS.models:
    cfg = model_config(name)
    for program in FLAGS.programs:
      t0 = time.time()
      ma = compile_program(program, cfg, mesh, plan).memory_analysis()
      rows = plan[{'stats': 'collect_batch', 'finetune': 'train_batch',
                   'evaluate': 'eval_batch'}[program]]
      fwd = flops_per_token(cfg, plan['seq'], logits=program != 'stats')
      flops = {'stats': 2 * fwd, 'finetune': 3 * fwd, 'evaluate': fwd}
      row = dict(model=name, devices=num_devices, program=program,
                 mesh=','.join(map(str, plan['mesh'])),
                 batch=f'{rows}x{plan["seq"]}',
                 args=ma.argument_size_in_bytes,
                 out=ma.output_size_in_bytes, temp=ma.temp_size_in_bytes,
                 alias=ma.alias_size_in_bytes,
                 flops_per_token=flops[program],
                 compile_s=round(time.time() - t0, 1))
      print('ROW ' + json.dumps(row), flush=True)


def main(argv):
  del argv
  if FLAGS.child:
    child(FLAGS.child)
    return
  print(bench_common.header('plan_7b', ' '.join(
      ['python benchmarks/plan_7b.py'] + sys.argv[1:])))
  rows = []
  for n in FLAGS.devices:
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={n}')
    cmd = [sys.executable, os.path.abspath(__file__), f'--child={n}',
           f'--models={",".join(FLAGS.models)}',
           f'--programs={",".join(FLAGS.programs)}']
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
      raise RuntimeError(f'{cmd} failed:\n{p.stderr[-4000:]}')
    for line in p.stdout.splitlines():
      if line.startswith('ROW '):
        rows.append(json.loads(line[4:]))
        print(line[4:], flush=True)
  print('\n| model | devices (mesh) | program | batch | args GB | out GB | '
        'temp GB | alias GB | peak GB | of budget | GFLOP/token |\n'
        '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |')
  for r in rows:
    peak = r['args'] + r['out'] + r['temp'] - r['alias']
    budget = PLANS[r['devices']]['budget_gb']
    print(f'| {r["model"]} | {r["devices"]} ({r["mesh"]}) | {r["program"]} '
          f'| {r["batch"]} | {r["args"] / GB:.2f} | {r["out"] / GB:.2f} | '
          f'{r["temp"] / GB:.2f} | {r["alias"] / GB:.2f} | {peak / GB:.2f} | '
          f'{peak / GB / budget:.0%} of {budget} GB | '
          f'{r["flops_per_token"] / 1e9:.1f} |')


if __name__ == '__main__':
  app.run(main)
