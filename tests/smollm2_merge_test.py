"""The SmolLM2 merge study end to end at toy size (configs/smollm2_merge.py).

`act_jax.main`'s pipeline with `configs/smollm2_merge.py:toy` on a tiny
random Llama (real safetensors checkpoint, char tokenizer): two specialists
are trained for real, statistics of three models are collected, and every
merge is built and evaluated; only the sizes are small.
"""

import json
import math
import os
import tempfile

from absl.testing import absltest
import numpy as np

from act_jax.pipeline import jobs
from act_jax.pipeline import report
from act_jax.pipeline import run as run_lib
import testutil


def _toy_config(source: str, cache: str):
  return testutil.toy_case_config('smollm2_merge.py', source, cache)


def _ppl_record(nll, tokens):
  return {'perplexity': float(np.exp(sum(nll) / sum(tokens))),
          'items': {'nll': nll, 'tokens': tokens}}


class MergeScoreTest(absltest.TestCase):

  def test_merge_score_is_the_geometric_mean_of_ppl_ratios(self):
    job = jobs.Job('merge', 'merge',
                   (jobs.Pair('la', 'sa', 'base', ('la',)),
                    jobs.Pair('lb', 'sb', 'base', ('lb',))),
                   base='base', abilities=('la', 'lb'))
    ppl = {'sa': (2.0, 50.0), 'sb': (40.0, 4.0), 'base': (10.0, 10.0)}
    recs = {m: {'metrics': {
        'la': _ppl_record([np.log(a)] * 4, [1] * 4),
        'lb': _ppl_record([np.log(b)] * 4, [1] * 4)}}
            for m, (a, b) in ppl.items()}
    view = report.JobView(job, {'order': list(recs), 'records': recs},
                          report.Resampler(50, 0.95))
    score = report.merge_score(view)
    self.assertAlmostEqual(score['sa']['value'], math.sqrt(1.0 * 50 / 4))
    self.assertAlmostEqual(score['base']['value'], math.sqrt(5.0 * 2.5))
    # Identical items: every resample gives the same value.
    self.assertAlmostEqual(score['base']['lo'], score['base']['hi'])


class MergeStudyTest(absltest.TestCase):

  def test_same_language_twice_is_refused(self):
    with tempfile.TemporaryDirectory() as tmp:
      src = os.path.join(tmp, 'src')
      testutil.make_tiny_hf(src, 'llama', seed=0, chat=True)
      c = _toy_config(src, tmp)
      c.case.languages = 'a:0,b:0'
      with self.assertRaisesRegex(ValueError, 'case.languages'):
        run_lib.run_pipeline(c, os.path.join(tmp, 'work'))

  def test_toy_merge_end_to_end_and_resume(self):
    with tempfile.TemporaryDirectory() as tmp:
      src = os.path.join(tmp, 'src')
      testutil.make_tiny_hf(src, 'llama', seed=0, chat=True)
      c = _toy_config(src, os.path.join(tmp, 'cache'))
      work = os.path.join(tmp, 'work')
      run_lib.run_pipeline(c, work)
      with open(os.path.join(work, 'evaluate', 'merge.json')) as f:
        rows = json.load(f)['results']
      expected = {'source', 'specialist_a', 'specialist_b', 'linear',
                  'task_arithmetic', 'ties', 'dare'}
      for rho in ('0.05', '0.2'):
        expected |= {f'act[mean_abs_diff]@{rho}', f'random@{rho}',
                     f'weight_diff@{rho}'}
      self.assertSetEqual(set(rows), expected)
      a, b = rows['specialist_a'], rows['specialist_b']
      # Two different specialists, each trained on its own language.
      self.assertNotAlmostEqual(a['conlang_b']['perplexity'],
                                b['conlang_b']['perplexity'], places=4)
      self.assertNotAlmostEqual(a['conlang_a']['perplexity'],
                                rows['source']['conlang_a']['perplexity'],
                                places=4)
      with open(os.path.join(work, 'results.json')) as f:
        res = json.load(f)
      score = res['jobs']['merge']['merge_score']
      self.assertEqual(set(score), expected)
      for s in score.values():
        self.assertLessEqual(s['lo'], s['value'] + 1e-9)
        self.assertGreaterEqual(s['hi'], s['value'] - 1e-9)
      with open(os.path.join(work, 'localize', 'analysis.json')) as f:
        ana = json.load(f)
      ov = ana['overlap']['merge/conlang_a vs merge/conlang_b']
      self.assertBetween(ov['jaccard'], 0.0, 1.0)
      with open(os.path.join(work, 'report.md')) as f:
        text = f.read()
      self.assertIn('| act[mean_abs_diff]@0.05 |', text)
      self.assertIn('| ties |', text)
      self.assertIn('Merge score', text)
      # A rerun resumes: same rows, every stage skipped.
      run_lib.run_pipeline(c, work)
      with open(os.path.join(work, 'evaluate', 'merge.json')) as f:
        self.assertEqual(json.load(f)['results'], rows)


if __name__ == '__main__':
  absltest.main()
