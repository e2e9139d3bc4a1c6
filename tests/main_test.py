"""End-to-end tests of `python -m act_jax.main` on the tiny demo config.

One full run (setUpClass) through every stage; a rerun must skip every
stage without touching its artifacts; a second run killed with SIGKILL in
the middle of a stage and rerun must end with the same results.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ('build_models', 'convert', 'collect', 'localize', 'transfer',
          'finetune', 'evaluate', 'report', 'export')


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


def _run(workdir, *extra):
  p = subprocess.run(_cmd(workdir, *extra), cwd=REPO, env=_env(),
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


if __name__ == '__main__':
  absltest.main()
