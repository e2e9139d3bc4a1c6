"""The pipeline's contracts: locked config, drift keys, the bootstrap and its
verdicts, the candidate registry, one compiled fine-tune step per structure,
and one-line CLI errors."""

import json
import os
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
import jax
import numpy as np

from act_jax.model import forward
from act_jax.model import sharding
from act_jax.model.config import ModelConfig
from act_jax.pipeline import candidates
from act_jax.pipeline import jobs
from act_jax.pipeline import report
from act_jax.pipeline import runner
from act_jax.train import finetune
import testutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(model_type='llama', vocab_size=48, hidden_size=32,
                  intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8)


class ConfigTest(absltest.TestCase):

  def test_misspelt_key_names_it_and_the_valid_keys(self):
    c = testutil.load_config('demo.py', 'tiny')
    with self.assertRaises(AttributeError):  # locked: config_flags refuses
      c.localize.scroe = 'x'
    c.localize.unlock()
    c.localize.scroe = 'x'
    with self.assertRaisesRegex(jobs.ConfigError,
                                "config.localize: unknown key 'scroe'; valid "
                                'keys: score, select, top_frac'):
      jobs.plan_from_config(c, '/tmp/w')
    c = testutil.load_config('demo.py', 'tiny')
    c.abilities.lang_a.unlock()
    c.abilities.lang_a.tempalte = 'qa'
    with self.assertRaisesRegex(jobs.ConfigError, 'abilities.lang_a.*tempalte'):
      jobs.plan_from_config(c, '/tmp/w')
    # Types are checked too (a hand-built section bypasses ConfigDict's).
    with self.assertRaisesRegex(jobs.ConfigError, 'collect.max_seq_len=2.5.*'
                                'integer'):
      jobs.section(jobs.CollectConfig, {'max_seq_len': 2.5}, 'collect')

  def test_plan_is_typed_and_lists_are_parsed_once(self):
    c = testutil.load_config('demo.py', 'tiny')
    plan = jobs.plan_from_config(c, '/w')
    self.assertEqual(plan.modes, ('recover', 'merge'))
    self.assertEqual(plan.rhos, (0.2,))
    self.assertEqual(plan.scores, ('mean_abs_diff',))
    self.assertTrue(plan.abilities['lang_a'].probe.startswith(
        '/w/build_models/'))
    rec, mer = plan.jobs
    self.assertEqual(rec.pairs[0].probe, ('arithmetic',))
    self.assertEqual([p.source for p in mer.pairs],
                     ['spec_lang_a', 'spec_reverse'])
    with self.assertRaises(Exception):  # frozen
      plan.localize.top_frac = 0.3  # pytype: disable=not-writable

  def test_registry_rows_of_a_sweep(self):
    c = testutil.load_config('smollm2_recover.py', 'study')
    c.sweep.scores = 'mean_abs_diff,diff_of_mean_abs'  # a wide sweep
    c.sweep.rhos, c.sweep.extra_rhos = '0.2,0.05,0.01', '0.5'
    c.sweep.finetune_rhos = ''
    plan = jobs.plan_from_config(c, '/w')
    names = [x.name for x in candidates.enumerate_candidates(plan.jobs[0],
                                                             plan)]
    self.assertLen(names, len(set(names)))
    for rho in ('0.2', '0.05', '0.01'):
      for s in ('mean_abs_diff', 'diff_of_mean_abs'):
        self.assertIn(f'act[{s}]@{rho}', names)
        self.assertIn(f'act[{s}]@{rho}+ft', names)
      for kind in ('random', 'weight_diff'):
        self.assertIn(f'{kind}@{rho}', names)
        self.assertIn(f'{kind}@{rho}+ft', names)
    # The extra budget is transplant only, first score only.
    self.assertIn('act[mean_abs_diff]@0.5', names)
    self.assertNotIn('act[diff_of_mean_abs]@0.5', names)
    self.assertNotIn('act[mean_abs_diff]@0.5+ft', names)
    for k in ('source', 'target', 'linear', 'task_arithmetic', 'ties', 'dare',
              'full_ft'):
      self.assertIn(k, names)
    self.assertLen(names, 7 + 4 * 3 + 3 + 4 * 3)
    self.assertEqual(candidates.primary(plan, True).name,
                     'act[mean_abs_diff]@0.05+ft')


class NewBaselineTest(absltest.TestCase):
  """A whole-model baseline added through the registry alone (no other
  library file edited) is built, scored and reported by the pipeline."""

  def test_a_registered_baseline_runs_through_the_tiny_pipeline(self):
    from act_jax.pipeline import run as run_lib  # pylint: disable=g-import-not-at-top

    def halfway(b, cand):  # a model_stock-like merge: base + t * mean delta
      del cand
      p = b.job.pairs[0]
      base, task = b.params(p.source), b.params(p.target)
      return jax.tree.map(lambda x, y: x + 0.5 * (y - x), base, task)

    candidates.register('halfway', halfway)
    self.addCleanup(candidates.REGISTRY.pop, 'halfway')
    with self.assertRaisesRegex(ValueError, 'registered already'):
      candidates.register('halfway', halfway)
    c = testutil.load_config('demo.py', 'tiny')
    c.mode = 'recover'
    c.sweep.candidates = 'source,target,linear,halfway'
    c.sweep.extra_rhos, c.sweep.finetune = '', ''
    c.case.base_steps, c.case.spec_steps = 4, 2
    c.case.num_probe = c.case.num_eval = 8
    c.evaluate.num_eval = 8
    c.report.bootstrap = 50
    c.report.plots = False
    work = tempfile.mkdtemp(prefix='new_baseline_')
    run_lib.run_pipeline(c, work)
    rows = json.load(open(os.path.join(work, 'evaluate', 'recover.json')))[
        'results']
    # The demo's linear baseline interpolates at baselines.interp_t=0.5
    # from the target too: the same params, so the same numbers.
    self.assertEqual(c.baselines.interp_t, 0.5)
    for a, m in rows['halfway'].items():
      for k, v in m.items():
        self.assertAlmostEqual(v, rows['linear'][a][k], places=5, msg=(a, k))
    self.assertNotEqual(rows['halfway'], rows['target'])
    with open(os.path.join(work, 'report.md')) as f:
      self.assertIn('| halfway |', f.read())


class DriftTest(absltest.TestCase):

  def test_code_change_stops_reuse_of_a_completed_stage(self):
    work = tempfile.mkdtemp()
    calls = []
    stage = runner.Stage('s', lambda ctx: calls.append(1), snapshot=[1],
                         code=('model',))
    runner.run_stages([stage], work)
    runner.run_stages([stage], work)  # unchanged: skipped
    self.assertLen(calls, 1)
    marker = runner.read_marker(work, 's')
    self.assertLen(marker['code'], 16)
    self.assertGreater(marker['peak_rss_mb'], 0)
    with mock.patch.object(runner, 'code_digest', lambda paths: 'other'):
      with self.assertRaisesRegex(runner.StageError,
                                  'completed by other act-jax code'):
        runner.run_stages([stage], work)
    changed = runner.Stage('s', stage.run, snapshot=[2], code=('model',))
    with self.assertRaisesRegex(runner.StageError, 'different config'):
      runner.run_stages([changed], work)

  def test_digest_follows_the_source(self):
    self.assertNotEqual(runner.code_digest(['model']),
                        runner.code_digest(['model', 'act']))
    with self.assertRaisesRegex(runner.StageError, 'not in'):
      runner.code_digest(['no_such_package'])


class BootstrapTest(absltest.TestCase):

  def _view(self, correct_by_cand, ppl_items=None):
    job = jobs.Job('recover', 'recover', (jobs.Pair('qa', 's', 't', ('qa',)),),
                   base='t', abilities=('qa',))
    recs = {}
    for cand, correct in correct_by_cand.items():
      recs[cand] = {'metrics': {'qa': {
          'exact_match': float(np.mean(correct)),
          'items': [{'correct': bool(c)} for c in correct]}}}
    return report.JobView(job, {'order': list(recs), 'records': recs},
                          report.Resampler(2000, 0.95))

  def test_paired_intervals_and_verdicts(self):
    rng = np.random.default_rng(0)
    base = rng.random(400) < 0.4
    flip = rng.random(400) < 0.15  # a candidate that fixes 15% of items
    view = self._view({'target': base, 'same': base.copy(),
                       'better': base | flip, 'worse': base & ~flip})
    same = view.compare('same', 'target', 'qa')
    self.assertEqual((same['lo'], same['hi']), (0.0, 0.0))
    self.assertEqual(same['verdict'], 'within noise')
    self.assertEqual(view.compare('better', 'target', 'qa')['verdict'],
                     'better')
    self.assertEqual(view.compare('worse', 'target', 'qa')['verdict'],
                     'worse')
    # The paired interval of a difference is tighter than the unpaired
    # spread of the two candidates' own intervals.
    d = view.compare('better', 'target', 'qa')
    lo_b, hi_b = view.rs.interval(view.reps('better', 'qa'))
    self.assertLess(d['hi'] - d['lo'], hi_b - lo_b)
    # The interval of one candidate covers a textbook binomial interval.
    p = float(np.mean(base))
    half = 1.96 * np.sqrt(p * (1 - p) / 400)
    lo, hi = view.rs.interval(view.reps('target', 'qa'))
    self.assertAlmostEqual(hi - lo, 2 * half, delta=0.01)

  def test_verdict_direction_follows_the_metric(self):
    self.assertEqual(report.verdict(0.1, 0.3, True), 'better')
    self.assertEqual(report.verdict(0.1, 0.3, False), 'worse')
    self.assertEqual(report.verdict(-0.3, -0.1, False), 'better')
    self.assertEqual(report.verdict(-0.1, 0.1, True), 'within noise')

  def test_small_difference_on_few_items_is_noise(self):
    rng = np.random.default_rng(1)
    base = rng.random(83) < 0.4
    plus = base.copy()
    plus[np.flatnonzero(~base)[:3]] = True  # 3 more questions right of 83
    view = self._view({'target': base, 'cand': plus})
    self.assertEqual(view.compare('cand', 'target', 'qa')['verdict'],
                     'within noise')


class CompiledStepTest(absltest.TestCase):

  def test_one_compile_serves_every_channel_set_of_a_structure(self):
    params = jax.device_get(forward.init_params(CFG, jax.random.key(0)))
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 48, (8, 12)).astype(np.int32)
    ones = np.ones_like(tokens)
    batches = [{'tokens_bt': tokens, 'attention_mask_bt': ones,
                'loss_mask_bt': ones}]
    tc = finetune.TrainConfig(num_steps=2, lr=1e-2, batch_size=8,
                              max_seq_len=12, save_every=0, log_every=100)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    finetune._STEPS.clear()  # pylint: disable=protected-access
    outs = []
    for seed in range(3):  # three channel sets, the same per-layer counts
      cols = np.zeros((CFG.num_layers, CFG.q_dim), bool)
      for l in range(CFG.num_layers):
        cols[l, np.random.RandomState(seed + l).permutation(CFG.q_dim)[:5]] = (
            True)
      mask = {'self_attn.q_proj': cols}
      outs.append(finetune.finetune(tc, params, CFG, batches, mask=mask,
                                    mesh=mesh))
    self.assertLen(finetune._STEPS, 1)  # pylint: disable=protected-access
    q = [np.asarray(o['layers']['self_attn']['q_proj']['kernel'])
         for o in outs]
    self.assertFalse(np.array_equal(q[0], q[1]))  # different channels moved


class CliTest(absltest.TestCase):

  def _run(self, module, *args):
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    env.pop('XLA_FLAGS', None)
    return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO,
                          env=env, capture_output=True, text=True,
                          timeout=300)

  def test_errors_are_one_line_with_exit_2(self):
    out = os.path.join(tempfile.mkdtemp(), 'x')  # does not exist
    for module, args, want in (
        ('act_jax.localize', [f'--out={out}'], '--stats is required'),
        ('act_jax.collect', ['--models=/nope', '--probe=p.jsonl',
                             f'--out={out}'],
         'missing checkpoint directory /nope'),
        ('act_jax.localize', ['--stats=/tmp', '--top_frac=x'],
         "flag --top_frac=x"),
        ('act_jax.main', [f'--workdir={out}_w',
                          '--config=configs/demo.py:tiny',
                          '--config.localize.score=bogus'],
         'localize.score'),
    ):
      p = self._run(module, *args)
      self.assertEqual(p.returncode, 2, (module, p.stderr[-2000:]))
      last = [l for l in p.stderr.splitlines() if l.strip()][-1]
      self.assertTrue(last.startswith('error: '), last)
      self.assertIn(want, last)
      self.assertNotIn('Traceback', p.stderr)

  def test_help_lists_the_modules_own_flags_first(self):
    p = self._run('act_jax.localize', '--help')  # absl exits 1 after help
    text = p.stdout + p.stderr
    self.assertNotIn('Traceback', text)
    own = text.index('act_jax/localize.py:')
    # Its own flags, the config-field ones included, come in its section.
    for flag in ('  --stats: ', '  --top_frac: rho: fraction of channels '
                 'per (layer, site)', '  --score: '):
      self.assertGreater(text.index(flag), own, flag)


if __name__ == '__main__':
  absltest.main()
