"""End-to-end tests of `python -m act_jax.main` on the tiny demo config.

One full run (setUpClass) through every stage; a rerun must skip every
stage without touching its artifacts; a second run killed with SIGKILL in
the middle of a stage and rerun must end with the same results. From the
same toy models (the reference run's build_models, copied), a 4-device
mesh in one process and 2 processes x 2 devices (launch/
local_multiprocess.sh) with --config.mesh_shape=1,2,2 give the same channel
masks and the same metrics (within one eval item), and every stage records
that mesh (a stage that used another one fails the run).
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest

from act_jax.io import atomic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ('build_models', 'convert', 'collect', 'localize', 'transfer',
          'finetune', 'evaluate', 'report', 'export')
MESH = ('--config.mesh_shape=1,2,2',
        # Fewer rows than the reference (the ones compared), to stay fast.
        '--config.sweep.extra_rhos=', '--config.sweep.selectors=act',
        '--config.sweep.candidates=source,target,ties')
MESH_RECORD = {'axes': {'data': 1, 'fsdp': 2, 'tensor': 2}, 'devices': 4}


def _cmd(workdir, *extra):
  return [sys.executable, '-m', 'act_jax.main',
          '--config=' + os.path.join(REPO, 'configs', 'demo.py') + ':tiny',
          '--workdir=' + workdir, '--alsologtostderr', *extra]


def _env():
  env = dict(os.environ)
  env.update(HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1',
             TOKENIZERS_PARALLELISM='false', JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)  # the CLI runs on the real (single) CPU device
  return env


def _run(workdir, *extra, env=None):
  p = subprocess.run(_cmd(workdir, *extra), cwd=REPO, env=env or _env(),
                     capture_output=True, text=True, timeout=900)
  if p.returncode:
    raise AssertionError(f'main failed ({p.returncode}):\n{p.stderr[-4000:]}')
  return p.stdout + p.stderr


def _results(workdir):
  out = {}
  for job in ('recover', 'merge'):
    with open(os.path.join(workdir, 'evaluate', job + '.json')) as f:
      out[job] = json.load(f)
  return out


class MainTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.workdir = os.path.join(cls.tmp, 'run')
    cls.log = _run(cls.workdir)

  def test_every_stage_completes_with_results(self):
    for s in STAGES:
      self.assertTrue(os.path.isfile(os.path.join(self.workdir, s,
                                                  'COMPLETE.json')), s)
      self.assertFalse(os.path.exists(os.path.join(self.workdir,
                                                   s + '.partial')), s)
    with open(os.path.join(self.workdir, 'results.json')) as f:
      res = json.load(f)
    rec = _results(self.workdir)['recover']['results']
    for cand in ('target', 'source', 'random@0.2', 'weight_diff@0.2',
                 'linear', 'task_arithmetic', 'ties', 'dare',
                 'act[mean_abs_diff]@0.2', 'act[mean_abs_diff]@0.2+ft',
                 'act[mean_abs_diff]@0.5', 'random@0.5'):
      self.assertIn(cand, rec)
      self.assertEqual(set(rec[cand]),
                       {'arithmetic', 'lang_a', 'lang_b', 'reverse'})
      self.assertBetween(rec[cand]['arithmetic']['exact_match'], 0.0, 1.0)
      self.assertGreater(rec[cand]['lang_a']['perplexity'], 1.0)
      # Every value in the report carries its interval.
      lo, hi = res['jobs']['recover']['values'][cand]['lang_a']['ci']
      self.assertLessEqual(lo, rec[cand]['lang_a']['perplexity'])
      self.assertGreaterEqual(hi, rec[cand]['lang_a']['perplexity'])
    self.assertIn('spec_reverse', _results(self.workdir)['merge']['results'])
    verdicts = {c['verdict'] for c in res['jobs']['recover']['comparisons']}
    self.assertLessEqual(verdicts, {'better', 'worse', 'within noise'})
    for group in ('concentration', 'overlap', 'act_vs_weight', 'stability'):
      self.assertNotEmpty(res['analysis'][group])
    self.assertTrue(os.path.isfile(os.path.join(self.workdir, 'report.md')))
    self.assertTrue(os.path.isfile(os.path.join(self.workdir, 'report',
                                                'concentration.png')))
    # Every result is exported as an HF directory with HF-named masks (a
    # merge: one file per specialist too).
    for job in ('recover', 'merge'):
      for result in ('act', 'act_ft'):
        out = os.path.join(self.workdir, 'export', job, result)
        for f in ('config.json', 'model.safetensors', 'README.md',
                  'channel_masks.json'):
          self.assertTrue(os.path.isfile(os.path.join(out, f)), (out, f))
    self.assertTrue(os.path.isfile(os.path.join(
        self.workdir, 'export', 'merge', 'act',
        'channel_masks.spec_reverse.json')))
    # The toy checkpoints are real HF directories.
    base = os.path.join(self.workdir, 'build_models', 'base')
    for f in ('config.json', 'model.safetensors', 'tokenizer.json'):
      self.assertTrue(os.path.isfile(os.path.join(base, f)), f)

  def test_rerun_skips_completed_stages(self):
    markers = {s: os.path.getmtime(os.path.join(self.workdir, s,
                                                'COMPLETE.json'))
               for s in STAGES}
    results = os.path.getmtime(os.path.join(self.workdir, 'results.json'))
    log = _run(self.workdir)
    for s in STAGES:
      self.assertIn(f'stage {s}: complete, skipping', log)
      self.assertEqual(markers[s], os.path.getmtime(
          os.path.join(self.workdir, s, 'COMPLETE.json')), s)
    self.assertEqual(results, os.path.getmtime(
        os.path.join(self.workdir, 'results.json')))

  def test_subset_reruns_only_named_stages(self):
    log = _run(self.workdir, '--config.stages=localize')
    self.assertIn('stage localize: complete, skipping', log)
    self.assertNotIn('stage collect', log)

  def test_sigkill_mid_stage_then_rerun_gives_same_results(self):
    workdir = os.path.join(self.tmp, 'killed')
    proc = subprocess.Popen(_cmd(workdir), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    # Kill inside `finetune`, after its first checkpoint, so both a whole
    # stage (.partial) and a mid-stage resume are exercised.
    work = os.path.join(workdir, 'finetune.partial', 'recover_work')
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:
      if os.path.isdir(work) and any(
          n.startswith('checkpoints') for n in os.listdir(work)):
        break
      time.sleep(0.2)
    self.assertIsNone(proc.poll(), 'the run finished before it was killed')
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    self.assertFalse(os.path.exists(os.path.join(workdir, 'finetune',
                                                 'COMPLETE.json')))
    log = _run(workdir)
    self.assertIn('stage finetune: resuming', log)
    self.assertIn('stage collect: complete, skipping', log)
    got, want = _results(workdir), _results(self.workdir)
    for job in want:
      for cand, per in want[job]['results'].items():
        for ability, metrics in per.items():
          for m, v in metrics.items():
            self.assertAlmostEqual(
                got[job]['results'][cand][ability][m], v, places=4,
                msg=f'{job}/{cand}/{ability}/{m}')

  def _mesh_workdir(self, name):
    """A fresh workdir holding the reference run's toy models."""
    workdir = os.path.join(self.tmp, name)
    shutil.copytree(os.path.join(self.workdir, 'build_models'),
                    os.path.join(workdir, 'build_models'))
    # A workdir is known by its marker alone: copy it with the stage.
    shutil.copy2(os.path.join(self.workdir, atomic.MARKER), workdir)
    return workdir

  def assert_same_as_reference(self, workdir):
    for s in STAGES[1:]:
      rec = json.load(open(os.path.join(workdir, s, 'COMPLETE.json')))
      self.assertEqual(rec['mesh'], MESH_RECORD, s)
    masks = sorted(glob.glob(os.path.join(self.workdir, 'localize', '*', '*',
                                          '*', 'channels.json')))
    self.assertLen(masks, 9)  # 3 pairs x act, random, weight_diff
    for path in masks:
      rel = os.path.relpath(path, self.workdir)
      with open(path, 'rb') as a, open(os.path.join(workdir, rel), 'rb') as b:
        self.assertEqual(a.read(), b.read(), rel)
    got, want = _results(workdir), _results(self.workdir)
    for job in want:
      self.assertGreaterEqual(len(got[job]['results']), 5)
      for cand, per in got[job]['results'].items():
        for ability, metrics in per.items():
          for m, v in metrics.items():
            ref = want[job]['results'][cand][ability][m]
            what = f'{job}/{cand}/{ability}/{m}'
            if m == 'exact_match':  # at most one of the 32 items differs
              self.assertLessEqual(abs(v - ref), 1 / 32 + 1e-9, what)
            else:
              self.assertAlmostEqual(v, ref, delta=1e-3 * ref, msg=what)

  def test_four_device_mesh_in_one_process_matches_one_device(self):
    workdir = self._mesh_workdir('mesh4')
    env = dict(_env(), XLA_FLAGS='--xla_force_host_platform_device_count=4')
    log = _run(workdir, *MESH, env=env)
    self.assertIn('stage build_models: complete, skipping', log)
    self.assert_same_as_reference(workdir)

  def test_two_processes_match_one_device(self):
    workdir = self._mesh_workdir('mesh2x2')
    env = dict(_env(), XLA_FLAGS='--xla_force_host_platform_device_count=2',
               PYTHON=sys.executable, LOG_DIR=workdir + '.logs')
    cmd = [os.path.join(REPO, 'launch', 'local_multiprocess.sh'), '2',
           'act_jax.main'] + _cmd(workdir, *MESH)[3:]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=1200)
    logs = [open(os.path.join(workdir + '.logs', f'proc{i}.log')).read()
            for i in range(2)]
    self.assertEqual(p.returncode, 0, logs[0][-3000:] + logs[1][-3000:])
    for i, log in enumerate(logs):
      self.assertIn(f'process {i}/2, 2 local / 4 global devices', log)
    self.assert_same_as_reference(workdir)


if __name__ == '__main__':
  absltest.main()
