"""Forward vs value_and_grad time of the demo's toy model (a CPU regression).

  python benchmarks/toy_step_bench.py [--calls=10]

Prints seconds per jitted call (compile excluded, best of --calls) for the
loss forward and for its value_and_grad, on the demo's toy shape (4 layers,
width 128, GQA 4/2, batch 32 x 64 tokens). Run it at two commits to
compare: a 2-D dot in `decoder.Linear` made the value_and_grad about 1.6x
faster than the 3-D dot before it (1.1 s -> 0.69 s a call, commits 982fca5
-> e10653d, with a second job on the machine).
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import bench_common
from act_jax.model import forward
from act_jax.model import losses
from act_jax.model.config import ModelConfig

_CALLS = flags.DEFINE_integer('calls', 10, 'Timed calls; the best counts.')


def main(argv):
  del argv
  print(bench_common.header('toy_step_bench', ' '.join(
      ['python benchmarks/toy_step_bench.py'] + sys.argv[1:])), flush=True)
  cfg = ModelConfig(
      model_type='llama', vocab_size=100, hidden_size=128,
      intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2,
      head_dim=32)
  params = forward.init_params(cfg, jax.random.key(0))
  rng = np.random.RandomState(0)
  batch = {
      'tokens_bt': jnp.asarray(rng.randint(0, 100, (32, 64)), jnp.int32),
      'attention_mask_bt': jnp.ones((32, 64), jnp.int32),
      'loss_mask_bt': jnp.ones((32, 64), jnp.float32),
  }

  def loss(p, b):
    # The mean next-token loss that train.finetune minimizes.
    total, count = losses.nll_sum(p, b, cfg)
    return total / jnp.maximum(count, 1.0)

  rows = []
  for name, fn in (('forward', jax.jit(loss)),
                   ('value_and_grad', jax.jit(jax.value_and_grad(loss)))):
    jax.block_until_ready(fn(params, batch))
    rows.append((name, bench_common.best_time(
        lambda fn=fn: jax.block_until_ready(fn(params, batch)),
        _CALLS.value)))
  print(f'\nload average at the end {bench_common.load_average()}')
  print('| call | s per call | vs forward |')
  print('|---|---|---|')
  for name, t in rows:
    print(f'| {name} | {t:.4f} | {t / rows[0][1]:.2f}x |')


if __name__ == '__main__':
  app.run(main)
