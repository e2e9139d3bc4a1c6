"""Fault injection: SIGKILL every stage of `act_jax.main` twice, then finish.

One uninterrupted reference run of the tiny demo (recover only, smaller
sweep and trainings) is made in setUpClass. For each stage, a fresh workdir
at the same path gets copies of the reference's earlier stages; the stage
alone (`--config.stages=<stage>`) is run three times: killed mid-stage
(after one of its artifacts, or right after an orbax checkpoint save was
started), killed inside a save (a temporary copy complete, not renamed; or
COMPLETE.json written, the folder not renamed), and to the end. Every
artifact of the stage must then equal the reference's byte for byte, except
for wall times and memory figures (`VOLATILE`), params dirs (orbax names its
data files at random: their arrays are compared bitwise) and the fine-tune
work folders (resume state and logs with wall times).

The kills are deterministic (`ACT_JAX_FAILPOINT`, see io/faults.py) and all
processes share one JAX compilation cache, so the matrix costs about two
reference runs.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

from act_jax.io import atomic
from act_jax.io import faults
from act_jax.io import inputs
from act_jax.io import params as params_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = (
    '--config.mode=recover', '--config.sweep.candidates=source,target',
    '--config.sweep.extra_rhos=', '--config.case.base_steps=4',
    '--config.case.spec_steps=2', '--config.case.num_probe=16',
    '--config.case.num_eval=8', '--config.case.num_sft=16',
    '--config.sft.num_records=16', '--config.collect.batch_size=4',
    '--config.collect.save_every=2', '--config.evaluate.num_eval=8',
    '--config.report.bootstrap=50', '--config.sweep.patch=act')
STAGES = ('build_models', 'convert', 'collect', 'localize', 'transfer',
          'finetune', 'evaluate', 'patch', 'report', 'export')
# (first kill: mid-stage, second kill: inside a save), scoped to the stage.
KILLS = {
    'build_models': ('atomic.after_rename~partial/base',
                     'atomic.before_rename~spec_reverse'),
    'convert': ('atomic.after_rename~partial/base',
                'atomic.before_rename~spec_lang_a'),
    'collect': ('checkpoint.saved', 'atomic.before_rename~half1'),
    'localize': ('atomic.after_rename~arithmetic/act', 'stage.before_rename'),
    'transfer': ('atomic.before_rename~recover/act', 'stage.before_complete'),
    'finetune': ('checkpoint.saved', 'atomic.before_rename~act_ft'),
    'evaluate': ('atomic.after_rename@2', 'atomic.before_rename~recover.json'),
    'patch': ('atomic.after_rename@2', 'atomic.before_rename~recover.json'),
    'report': ('atomic.after_rename', 'stage.before_rename'),
    'export': ('atomic.after_rename~recover/act', 'stage.before_complete'),
}
# Keys of JSON artifacts that hold wall times or memory figures.
VOLATILE = ('finished', 'wall_s', 'peak_rss_mb', 'eval_s', 'finetune_s',
            'seconds', 'tokens_per_s')
SKIP_DIRS = ('_work', '.work')  # fine-tune resume state and logs


def _env(cache):
  env = dict(os.environ)
  env.update(HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1',
             TOKENIZERS_PARALLELISM='false', JAX_PLATFORMS='cpu',
             JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  env.pop('XLA_FLAGS', None)
  env.pop(faults.FAILPOINT_ENV, None)
  return env


def _main(workdir, env, *extra):
  cmd = [sys.executable, '-m', 'act_jax.main',
         '--config=' + os.path.join(REPO, 'configs', 'demo.py') + ':tiny',
         '--workdir=' + workdir, *OVERRIDES, *extra]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)


def _strip(x):
  if isinstance(x, dict):
    return {k: _strip(v) for k, v in x.items() if k not in VOLATILE}
  if isinstance(x, list):
    return [_strip(v) for v in x]
  return x


def _report_text(path):
  """report.md without its wall-time / memory section."""
  out, skip = [], False
  with open(path, encoding='utf-8') as f:
    for line in f:
      if line.startswith('## '):
        skip = line.startswith('## Wall time')
      if not skip:
        out.append(line)
  return ''.join(out)


def _files(root):
  """`{relative path: kind}`; params dirs (orbax) as one entry each."""
  out = {}
  for d, dirs, fs in os.walk(root):
    rel = os.path.relpath(d, root)
    if any(rel.endswith(s) for s in SKIP_DIRS):
      dirs[:] = []
      continue
    if os.path.basename(d) == params_io.PARAMS and os.path.isfile(
        os.path.join(os.path.dirname(d), params_io.MODEL_CONFIG)):
      out[rel] = 'params'
      dirs[:] = []
      continue
    for f in fs:
      if f != inputs.CACHE_FILE:
        out[os.path.normpath(os.path.join(rel, f))] = 'file'
  return out


class FaultMatrixTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp(prefix='faults_test_')
    cls.env = _env(os.path.join(cls.tmp, 'jax_cache'))
    cls.work = os.path.join(cls.tmp, 'w')  # every run's path (paths in
    cls.ref = os.path.join(cls.tmp, 'ref')  # artifacts are the same)
    p = _main(cls.work, cls.env)
    if p.returncode:
      raise AssertionError(f'reference run failed:\n{p.stderr[-4000:]}')
    os.rename(cls.work, cls.ref)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def assert_same_artifacts(self, got_root, want_root, where):
    got, want = _files(got_root), _files(want_root)
    self.assertEqual(sorted(got), sorted(want), f'{where}: file sets differ')
    for rel, kind in want.items():
      a, b = os.path.join(got_root, rel), os.path.join(want_root, rel)
      if kind == 'params':
        ta, tb = params_io.restore_pytree(a), params_io.restore_pytree(b)
        self.assertEqual(jax.tree.structure(ta), jax.tree.structure(tb))
        for x, y in zip(jax.tree.leaves(ta), jax.tree.leaves(tb)):
          np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                        err_msg=f'{where}/{rel}')
        continue
      with open(a, 'rb') as f, open(b, 'rb') as g:
        ba, bb = f.read(), g.read()
      if ba == bb:
        continue
      if rel.endswith('.json'):
        self.assertEqual(_strip(json.loads(ba)), _strip(json.loads(bb)),
                         f'{where}/{rel}')
      elif rel.endswith('report.md'):
        self.assertEqual(_report_text(a), _report_text(b), f'{where}/{rel}')
      else:
        self.fail(f'{where}/{rel} differs from the uninterrupted run')

  @parameterized.named_parameters(*[(s, s) for s in STAGES])
  def test_killed_twice_then_finished_equals_uninterrupted(self, stage):
    shutil.rmtree(self.work, ignore_errors=True)
    os.makedirs(self.work)
    shutil.copy2(os.path.join(self.ref, atomic.MARKER), self.work)
    for s in STAGES[:STAGES.index(stage)]:
      shutil.copytree(os.path.join(self.ref, s), os.path.join(self.work, s),
                      symlinks=True)
    only = f'--config.stages={stage}'
    for point in KILLS[stage]:
      env = dict(self.env, **{faults.FAILPOINT_ENV: f'{stage}/{point}'})
      p = _main(self.work, env, only)
      self.assertEqual(p.returncode, -signal.SIGKILL,
                       f'{stage}: {point} was never reached:\n'
                       f'{p.stderr[-3000:]}')
      self.assertFalse(os.path.exists(os.path.join(self.work, stage,
                                                   'COMPLETE.json')))
    p = _main(self.work, self.env, only)
    self.assertEqual(p.returncode, 0, p.stderr[-4000:])
    self.assertIn(f'stage {stage}: resuming', p.stderr)
    self.assertFalse(os.path.exists(os.path.join(self.work,
                                                 stage + '.partial')))
    self.assertFalse(os.path.exists(os.path.join(self.work, '.lock')))
    self.assert_same_artifacts(os.path.join(self.work, stage),
                               os.path.join(self.ref, stage), stage)
    if stage == 'report':
      for name in ('report.md', 'results.json'):
        self.assert_same_artifacts_file(name)

  def assert_same_artifacts_file(self, name):
    a, b = os.path.join(self.work, name), os.path.join(self.ref, name)
    if name.endswith('.md'):
      self.assertEqual(_report_text(a), _report_text(b), name)
    else:
      self.assertEqual(_strip(atomic.read_json(a)),
                       _strip(atomic.read_json(b)), name)


if __name__ == '__main__':
  absltest.main()
