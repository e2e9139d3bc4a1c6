"""Benchmarks cannot rot: each benchmark's main runs at tiny sizes.

Every script in benchmarks/ that this suite owns runs end to end in its own
process (as a user would start it) on a tiny model, and must exit cleanly
and print its header and its table. The figures themselves are not checked:
speed is measured by running the scripts, never in tests.
(transfer_bench.py builds four SmolLM2-sized checkpoints and runs mergekit:
too heavy for this suite.)
"""

import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized

import testutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    'collect_bench': (['--hidden=64', '--layers=2', '--heads=2',
                       '--kv_heads=1', '--intermediate=128', '--vocab=256',
                       '--batch=2', '--seq=16', '--steps=1', '--rounds=1',
                       '--gemm_n=64', '--dtypes=float32'],
                      '| model | dtype | K | ours / hooks |'),
    'train_bench': (['--hidden=128', '--layers=2', '--vocab=256', '--batch=2',
                     '--seq=16', '--steps=1', '--rounds=1', '--gemm_n=64'],
                    '| implementation | vs torch |'),
    'eval_bench': (['--model=random', '--hidden=64', '--layers=2',
                    '--vocab=256', '--batch=2', '--seq=16', '--ppl_batches=1',
                    '--gen_prompts=3', '--prompt_len=6', '--new_tokens=3',
                    '--rounds=1'],
                   '| metric | ours / transformers |'),
    'convert_bench': (['--repeats=1'], '| method | wall / floor |'),
    'toy_step_bench': (['--calls=1'], '| call | s per call |'),
    'step_loop_bench': (['--steps=2', '--hidden=64'],
                        '| steps | s | steps/s | loss digest |'),
    # Compiled ahead of time only (no weights): a tiny shape on 8 devices.
    'plan_7b': (['--models=tiny', '--devices=8'],
                '| model | devices (mesh) | program | batch |'),
}


class BenchmarksTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.hf_dir = os.path.join(cls.tmp, 'hf')
    testutil.make_tiny_hf(cls.hf_dir, 'llama')

  @parameterized.named_parameters((n, n) for n in sorted(TINY))
  def test_runs_and_prints_its_table(self, name):
    args, table = TINY[name]
    if name == 'convert_bench':
      args = args + [f'--checkpoint={self.hf_dir}']
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1')
    env.pop('XLA_FLAGS', None)  # one CPU device, as a user runs them
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'benchmarks', f'{name}.py')] +
        args, cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600, check=False)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    self.assertIn(f'# {name}\ncommand: python benchmarks/{name}.py',
                  proc.stdout)
    self.assertIn('load average', proc.stdout)
    self.assertIn(table, proc.stdout)


if __name__ == '__main__':
  absltest.main()
