"""The specialization-strength study: its facts, splits, seeds, patching and
cross-run report, at toy size.

The data tests read the real `countryinfo` package. The study test runs
`configs/smollm2_strength.py:toy-<n>` (every stage for real, on a tiny
random Llama with a char tokenizer) at two specialist lengths and builds the
cross-run report from the two workdirs; only the sizes are small.
"""

import json
import os
import tempfile

from absl.testing import absltest
import numpy as np

from act_jax.cases.smollm2 import corpus
from act_jax.cases.smollm2 import facts
from act_jax.cases.smollm2 import qa
from act_jax.eval import metrics as eval_metrics
from act_jax.pipeline import candidates
from act_jax.pipeline import intervals
from act_jax.pipeline import jobs
from act_jax.pipeline import preflight
from act_jax.pipeline import run as run_lib
from act_jax.pipeline import strength
import testutil


class FactsTest(absltest.TestCase):

  def test_items_from_the_package_are_clean_and_deterministic(self):
    items = facts.fact_items(min_population=100000)
    self.assertEqual(items, facts.fact_items(min_population=100000))
    by_cat = {}
    for it in items:
      by_cat.setdefault(it.category, []).append(it)
    self.assertEqual(set(by_cat), {f'country_{k}' for k in facts.KINDS})
    self.assertGreater(len(items), 600)
    for it in items:
      self.assertNotEmpty(it.answers, it.question)
      # The question never gives its answer away (match='contains').
      self.assertFalse(eval_metrics.answer_correct(it.question, it.answers,
                                                   'contains')[1], it)
    cap = {it.question: it.answers for it in by_cat['country_capital']}
    self.assertIn('Paris', cap['What is the capital of France?'])
    self.assertIn('Brasilia', cap['What is the capital of Brazil?'])
    cont = {it.question: it.answers for it in by_cat['country_continent']}
    self.assertEqual(cont['On which continent is Kenya?'], ('Africa',))
    border = {it.question: it.answers for it in by_cat['country_border']}
    self.assertIn('Spain', border['Name a country that borders France.'])
    self.assertLen(facts.fact_items(('capital',), per_kind=5), 5)
    with self.assertRaisesRegex(ValueError, 'unknown fact kinds'):
      facts.fact_items(('currency',))

  def test_three_way_split_keeps_the_old_test_half(self):
    old_eval, _ = qa.split_items(0, 0.5)
    ev, dev, tr = qa.split_three(qa.all_items(), 0, 0.5, 0.25)
    self.assertEqual(ev, old_eval)
    q = lambda xs: {i.question for i in xs}
    self.assertEmpty(q(ev) & q(dev))
    self.assertEmpty(q(dev) & q(tr))
    self.assertLen(q(ev) | q(dev) | q(tr), len(qa.all_items()))
    with self.assertRaisesRegex(ValueError, 'fractions'):
      qa.split_three(qa.all_items(), 0, 0.8, 0.3)

  def test_study_corpus_sizes_and_disjoint_splits(self):
    c = testutil.load_config('smollm2_strength.py', '50')
    cfg = corpus.CorpusConfig(**c.case.data.to_dict())
    recs = {k: corpus.qa_records(v) for k, v in zip(
        ('qa_eval', 'qa_dev', 'qa_train'), qa.split_three(
            corpus.qa_items(cfg), cfg.seed, cfg.qa_eval_frac,
            cfg.qa_dev_frac))}
    self.assertGreaterEqual(len(recs['qa_eval']), 300)
    self.assertGreaterEqual(len(recs['qa_dev']), 300)
    qs = {k: {r['question'] for r in v} for k, v in recs.items()}
    self.assertEmpty(qs['qa_eval'] & qs['qa_dev'])
    self.assertEmpty((qs['qa_eval'] | qs['qa_dev']) & qs['qa_train'])
    self.assertLen(qs['qa_eval'] | qs['qa_dev'] | qs['qa_train'],
                   sum(len(v) for v in recs.values()))  # no duplicates
    paras = corpus.split_paragraphs(cfg)
    self.assertLen(paras['english_dev'], 48)
    self.assertEmpty(set(paras['english_dev']) & (
        set(paras['english_eval']) | set(paras['english_probe'])))
    # Asking for dev paragraphs moves no other paragraph.
    plain = corpus.split_paragraphs(corpus.CorpusConfig(
        english_eval_paragraphs=48, conlang_eval_paragraphs=48,
        english_probe_paragraphs=64))
    for k in ('english_eval', 'english_probe', 'conlang_eval',
              'conlang_train'):
      self.assertEqual(paras[k], plain[k], k)


class StudyConfigTest(absltest.TestCase):

  def test_rows_seeds_and_checks(self):
    c = testutil.load_config('smollm2_strength.py', '200')
    self.assertEqual(c.case.specialist.num_steps, 200)
    plan = jobs.plan_from_config(c, '/tmp/w')
    preflight.check_plan(plan)
    names = [x.name for x in candidates.enumerate_candidates(plan.jobs[0],
                                                             plan)]
    self.assertIn('act[attribution]@0.01', names)
    self.assertIn('random@0.05#s2', names)
    self.assertIn('weight_diff@0.2+ft#s1', names)
    self.assertIn('full_ft#s0', names)
    self.assertNotIn('weight_diff@0.2#s0', names)  # deterministic: one row
    self.assertEqual(candidates.primary(plan, True).name,
                     'act[mean_abs_diff]@0.05+ft#s0')
    patch = [x.name for x in candidates.enumerate_patch_candidates(
        plan.jobs[0], plan)]
    self.assertEqual(patch[:2], ['target', 'source'])
    self.assertIn('random@0.01#s1', patch)
    for key, value, want in (
        ('collect.attribution', False, 'collect.attribution'),
        ('evaluate.split', 'dev,val', 'evaluate.split'),
        ('sweep.seeds', '0,0', 'sweep.seeds'),
        ('sweep.patch', 'act,bogus', 'sweep.patch')):
      bad = testutil.load_config('smollm2_strength.py', '200')
      section, field = key.split('.')
      bad[section][field] = value
      with self.assertRaisesRegex(preflight.PreflightError, want):
        preflight.check_plan(jobs.plan_from_config(bad, '/tmp/w'))
    bad = testutil.load_config('smollm2_strength.py', '200')
    bad.abilities.english.dev = ''
    with self.assertRaisesRegex(preflight.PreflightError,
                                'abilities.english.dev'):
      preflight.check_plan(jobs.plan_from_config(bad, '/tmp/w'))
    with self.assertRaisesRegex(ValueError, 'specialist'):
      testutil.load_config('smollm2_strength.py', 'many')


class SeedBootstrapTest(absltest.TestCase):

  def test_seeds_pool_into_one_row_whose_interval_covers_seed_noise(self):
    job = jobs.Job('recover', 'recover', (jobs.Pair('qa', 's', 't', ('qa',)),),
                   base='t', abilities=('qa',))
    rng = np.random.default_rng(0)
    base = rng.random(300) < 0.4
    recs = {'target': base}
    for s in range(3):  # three seeds of one row, each a different draw
      recs[f'random@0.05#s{s}'] = base | (rng.random(300) < 0.05 * (s + 1))
    data = {'order': list(recs), 'records': {
        k: {'metrics': {'qa': {'exact_match': float(np.mean(v)),
                               'items': [{'correct': bool(c)} for c in v]}}}
        for k, v in recs.items()}}
    view = intervals.JobView(job, data, intervals.Resampler(2000, 0.95))
    self.assertEqual(view.order, ['target', 'random@0.05'])
    self.assertEqual(view.seeds('random@0.05'), 3)
    means = [float(np.mean(recs[f'random@0.05#s{s}'])) for s in range(3)]
    self.assertAlmostEqual(view.value('random@0.05', 'qa'), np.mean(means))
    # Resampling seeds widens the interval beyond the items' alone.
    one = intervals.JobView(job, {'order': ['target', 'random@0.05#s1'],
                                  'records': data['records']},
                            intervals.Resampler(2000, 0.95))
    lo, hi = view.rs.interval(view.reps('random@0.05', 'qa'))
    lo1, hi1 = one.rs.interval(one.reps('random@0.05', 'qa'))
    self.assertGreater(hi - lo, hi1 - lo1)
    self.assertEqual(view.compare('random@0.05', 'target', 'qa')['verdict'],
                     'better')


class StudyTest(absltest.TestCase):

  def test_two_lengths_end_to_end_and_the_cross_run_report(self):
    with tempfile.TemporaryDirectory() as tmp:
      src = os.path.join(tmp, 'src')
      testutil.make_tiny_hf(src, 'llama', seed=0, chat=True)
      works = []
      for arg in ('toy-1', 'toy-3'):
        c = testutil.load_config('smollm2_strength.py', arg)
        c.case.source = src
        c.case.cache_dir = os.path.join(tmp, 'cache')
        # Fewer rows than the study, the same kinds of row.
        c.sweep.rhos = '0.05'
        c.sweep.scores = 'mean_abs_diff,attribution'
        c.sweep.finetune = 'act,random'
        c.sweep.finetune_rhos = ''
        c.sweep.candidates = 'source,target,full_ft'
        c.sweep.patch = 'act,random'
        works.append(os.path.join(tmp, arg))
        run_lib.run_pipeline(c, works[-1])
      work = works[0]
      with open(os.path.join(work, 'evaluate', 'recover.json')) as f:
        table = json.load(f)
      self.assertEqual(table['split'], 'dev')
      self.assertEqual(set(table['splits']), {'test'})
      self.assertIn('random@0.05#s1', table['results'])
      self.assertIn('act[attribution]@0.05+ft#s1', table['results'])
      with open(os.path.join(work, 'evaluate', 'recover',
                             'act[attribution]@0.05.json')) as f:
        rec = json.load(f)
      # Every row is measured on both splits, each on its own items.
      dev_n = len(rec['metrics']['qa']['items'])
      test_n = len(rec['splits']['test']['qa']['items'])
      self.assertGreater(dev_n, 0)
      self.assertGreater(test_n, 0)
      dev_q = {i['prompt'] for i in rec['metrics']['qa']['items']}
      test_q = {i['prompt'] for i in rec['splits']['test']['qa']['items']}
      self.assertEmpty(dev_q & test_q)
      # Different seeds of the random row are different channel sets.
      with open(os.path.join(work, 'patch', 'recover.json')) as f:
        patch = json.load(f)
      p = patch['results']
      self.assertNotEqual(p['random@0.05#s0']['qa']['perplexity'],
                          p['random@0.05#s1']['qa']['perplexity'])
      self.assertNotEqual(p['target']['qa']['perplexity'],
                          p['source']['qa']['perplexity'])
      with open(os.path.join(work, 'results.json')) as f:
        res = json.load(f)
      self.assertEqual(res['setup']['specialist']['num_steps'], 1)
      self.assertEqual(res['jobs']['recover']['seeds']['random@0.05'], 2)
      self.assertIn('attribution', res['analysis']['concentration'][
          'recover/qa'])
      comps = res['patch']['recover']['test']['comparisons']
      self.assertIn(('act[attribution]@0.05', 'random@0.05'),
                    {(c['candidate'], c['reference']) for c in comps})
      with open(os.path.join(work, 'report.md')) as f:
        text = f.read()
      for heading in ('## recover, dev split', '## recover, test split',
                      '## Activation patching: recover, test split'):
        self.assertIn(heading, text)
      out = os.path.join(tmp, 'docs', 'strength.md')
      strength.build_strength_report(works, out)
      with open(out) as f:
        text = f.read()
      self.assertIn('| 1 steps | 3 steps |', text)
      self.assertIn('| act[attribution]@0.05 | random@0.05 |', text)
      for png in ('concentration_curves', 'concentration_vs_length',
                  'advantage_vs_length', 'advantage_ft_vs_length'):
        self.assertTrue(os.path.isfile(os.path.join(
            tmp, 'docs', 'strength', png + '.png')), png)
      self.assertEqual(strength.main([f'--workdirs={works[0]},{tmp}/none',
                                      f'--out={out}']), 2)


if __name__ == '__main__':
  absltest.main()
