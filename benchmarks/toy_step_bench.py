"""Forward vs value_and_grad time of the demo's toy model (a CPU regression check).

  python benchmarks/toy_step_bench.py

Prints seconds per jitted call (compile excluded) for the loss forward and for
its value_and_grad, on the demo's toy shape (4 layers, width 128, GQA 4/2,
batch 32 x 64 tokens). Run it at two commits to compare, e.g. 982fca5 (3-D
dot in `model.Linear`) and e10653d (2-D dot): on the 2-core machine the
value_and_grad went from 1.1 s to 0.69 s with a second job running (measured
with the toy loop's own loss, since folded into `act_jax.losses.nll_sum`).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from act_jax.model import forward
from act_jax.model import losses
from act_jax import model_config


def main():
  cfg = model_config.ModelConfig(
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

  for name, fn in (('forward', jax.jit(loss)),
                   ('value_and_grad', jax.jit(jax.value_and_grad(loss)))):
    jax.block_until_ready(fn(params, batch))
    t0 = time.time()
    for _ in range(10):
      out = fn(params, batch)
    jax.block_until_ready(out)
    print(f'{name}: {(time.time() - t0) / 10:.4f} s per call')


if __name__ == '__main__':
  main()
