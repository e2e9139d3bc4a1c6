"""Real processes: 2-process jax.distributed run and SIGKILL + resume.

Both compare against one uninterrupted in-process run of the same CLI.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import types

from absl.testing import absltest
import numpy as np

import testutil
from act_jax import collect as collect_cli
from act_jax import data
from act_jax.io import stats as stats_io
from act_jax.model import capture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITES = ('self_attn.q_proj', 'mlp.down_proj', 'mlp.down_proj.in')


def _env(devices):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['PYTHON'] = sys.executable
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  env['JAX_PLATFORMS'] = 'cpu'
  return env


class CollectMultiprocessTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.dirs = [os.path.join(cls.tmp, f'm{i}') for i in range(2)]
    for i, d in enumerate(cls.dirs):
      testutil.make_tiny_hf(d, 'llama', seed=i)
    cls.probe = os.path.join(cls.tmp, 'probe.jsonl')
    rng = np.random.RandomState(0)
    with open(cls.probe, 'w') as f:
      for i in range(21):  # 11 batches of 2: uneven split over 2 processes
        words = ['w%d' % rng.randint(100) for _ in range(rng.randint(1, 8))]
        f.write(json.dumps({'question': f'q{i}: ' + ' '.join(words),
                            'answer': str(i)}) + '\n')
    cls.args = dict(models=cls.dirs, probe=cls.probe, template='qa',
                    prompt_field='question',
                    max_seq_len=40, batch_size=2, count_tokens='response',
                    sites=','.join(SITES))
    ref_out = os.path.join(cls.tmp, 'ref')
    collect_cli.run_cli(types.SimpleNamespace(**cls._all_flags(cls.args,
                                                               ref_out)))
    cls.ref = stats_io.load_stats(ref_out)

  @staticmethod
  def _all_flags(args, out):
    base = dict(out=out, tokenizer=None, text_field='text',
                response_field='answer',
                qa_format=data.DEFAULT_QA_FORMAT, split='train', num_probe=0,
                probe_pack=False, overflow='truncate',
                mesh_shape=['-1', '1', '1'], models_axis=None,
                models_per_pass=0, dtype='', save_every=0, throttle_s=0.0,
                shuffle_seed=None, overwrite=False, restart=False,
                follow_symlinks=False, attribution=False)
    base.update(args)
    return base

  def _cli_args(self, out, **extra):
    a = dict(self.args, out=out, **extra)
    argv = []
    for k, v in a.items():
      v = ','.join(v) if isinstance(v, list) else v
      argv.append(f'--{k}={v}')
    return argv

  def assert_same_stats(self, got):
    self.assertEqual(got.count.tolist(), self.ref.count.tolist())
    self.assertGreater(int(got.count[0]), 0)
    for site in SITES:
      for stat, want in self.ref.arrays[site].items():
        np.testing.assert_allclose(got.arrays[site][stat], want, rtol=1e-5,
                                   atol=1e-5 * np.abs(want).max(),
                                   err_msg=f'{site}/{stat}')

  def test_two_processes_equal_one(self):
    out = os.path.join(self.tmp, 'mp')
    cmd = [os.path.join(ROOT, 'launch', 'local_multiprocess.sh'), '2',
           'act_jax.collect'] + self._cli_args(out)
    proc = subprocess.run(cmd, env=_env(2), cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    self.assertEqual(proc.returncode, 0, proc.stdout[-3000:])
    got = stats_io.load_stats(out)
    self.assertEqual(got.manifest['capture']['process_count'], 2)
    self.assertEqual(got.manifest['batch_size'], 4)
    self.assertTrue(got.manifest['pairwise'])
    self.assert_same_stats(got)

  def test_killed_and_resumed_equals_uninterrupted(self):
    out = os.path.join(self.tmp, 'resumed')
    ckpt = out + '.ckpt'
    cmd = [sys.executable, '-m', 'act_jax.collect'] + self._cli_args(
        out, save_every=2, throttle_s=0.5)
    proc = subprocess.Popen(cmd, env=_env(1), cwd=ROOT,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
      saved = [d for d in os.listdir(ckpt)] if os.path.isdir(ckpt) else []
      if any(d.isdigit() for d in saved):
        break
      time.sleep(0.1)
    self.assertIsNone(proc.poll(), 'the run ended before it could be killed')
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    self.assertFalse(os.path.exists(out))
    rerun = subprocess.run(cmd[:-1] + ['--throttle_s=0'], env=_env(1),
                           cwd=ROOT, capture_output=True, text=True,
                           timeout=240)
    self.assertEqual(rerun.returncode, 0, rerun.stderr[-3000:])
    resumed = [l for l in rerun.stderr.splitlines() if 'resumed from' in l]
    self.assertLen(resumed, 1, rerun.stderr[-3000:])
    start = int(resumed[0].split('resumed from batch ')[1].split()[0])
    self.assertBetween(start, 2, 10)
    self.assertFalse(os.path.exists(ckpt))  # removed after success
    self.assert_same_stats(stats_io.load_stats(out))


if __name__ == '__main__':
  absltest.main()
