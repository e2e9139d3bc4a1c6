"""The fine-tune step loop's host overhead: `train.finetune` end to end.

  python benchmarks/step_loop_bench.py [--steps=60] [--hidden=256]

A ~4M-param Llama (4 layers, width 256, vocab 2048) fine-tuned on random
8 x 64 batches with channel masks, where per-step host work (reading the
metrics, staging the next batch) is a visible share of a step. Prints the
steps/s of the loop (an N+1-step run minus a 1-step run: compiles cancel)
and a digest of the logged losses, so two commits compare both speed and the loss curve (the
digest must be equal: the loop's schedule may change, its numbers may not).
Run it at two commits with the same flags, e.g. from a `git worktree` of the
older one: `cd OLD && python /path/to/benchmarks/step_loop_bench.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import numpy as np

sys.path.insert(0, os.getcwd())  # the checkout being measured
# pylint: disable=g-import-not-at-top,wrong-import-position
import bench_common
from act_jax.act import masks as masks_lib
from act_jax.model import forward
from act_jax.model.config import ModelConfig
from act_jax.train import finetune

_STEPS = flags.DEFINE_integer('steps', 60, 'Steps timed (after the first).')
_HIDDEN = flags.DEFINE_integer('hidden', 256, 'Model width.')


def main(argv):
  del argv
  print(bench_common.header('step_loop_bench', ' '.join(
      ['python benchmarks/step_loop_bench.py'] + sys.argv[1:])), flush=True)
  cfg = ModelConfig(model_type='llama', vocab_size=2048,
                    hidden_size=_HIDDEN.value,
                    intermediate_size=2 * _HIDDEN.value, num_layers=4,
                    num_heads=4, num_kv_heads=2, head_dim=_HIDDEN.value // 4,
                    max_position_embeddings=128)
  params = forward.init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  batches = [{'tokens_bt': rng.integers(0, cfg.vocab_size, (8, 64)),
              'attention_mask_bt': np.ones((8, 64), np.int32),
              'loss_mask_bt': np.ones((8, 64), np.int32)}
             for _ in range(8)]
  sites = masks_lib.site_shapes(cfg)
  mask = {s: rng.random(shape) < 0.05 for s, shape in sites.items()}
  tree = masks_lib.leaf_masks(mask, params)
  def run(steps):
    tc = finetune.TrainConfig(scope='channels', num_steps=steps,
                              batch_size=8, max_seq_len=64, lr=1e-4,
                              save_every=0, log_every=10**6)
    with tempfile.TemporaryDirectory() as work:
      t0 = time.time()
      finetune.finetune(tc, params, cfg, batches, mask=tree, workdir=work)
      wall = time.time() - t0
      with open(os.path.join(work, 'metrics.jsonl')) as f:
        return wall, [json.loads(line)['loss'] for line in f]

  # Each call compiles once: the difference of a 1-step and an N+1-step
  # run is N steps of the loop, host work included.
  one, _ = run(1)
  wall, losses = run(_STEPS.value + 1)
  losses = np.asarray(losses, np.float64)
  print(f'\nload average at the end {bench_common.load_average()}')
  print(f'params {forward.count_params(params):,}, batch 8 x 64 tokens')
  print('| steps | s | steps/s | loss digest | last loss |')
  print('|---|---|---|---|---|')
  print(f'| {_STEPS.value} | {wall - one:.2f} | '
        f'{_STEPS.value / (wall - one):.2f} | '
        f'{hashlib.sha256(losses.tobytes()).hexdigest()[:16]} | '
        f'{losses[-1]:.6f} |')


if __name__ == '__main__':
  app.run(main)
