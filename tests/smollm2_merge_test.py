"""The SmolLM2 merge case end to end at toy size (configs/smollm2_merge.py).

`merge_run.run` with `get_config('case_toy')` on a tiny random Llama (real
safetensors checkpoint, char tokenizer): two specialists are trained for
real, statistics of three models are collected, and every merge is built
and evaluated; only the sizes are small.
"""

import json
import math
import os
import tempfile

from absl.testing import absltest

from act_jax.smollm2 import merge_report, merge_run
import testutil


def _toy_config(source: str, cache: str):
  return testutil.toy_case_config('smollm2_merge.py', source, cache)


class MergeCaseTest(absltest.TestCase):

  def test_lang_ratio(self):
    rows = {'specialist_a': {'conlang_a_ppl': 2.0, 'conlang_b_ppl': 50.0},
            'specialist_b': {'conlang_a_ppl': 40.0, 'conlang_b_ppl': 4.0}}
    self.assertAlmostEqual(
        merge_report.lang_ratio(rows['specialist_a'], rows),
        math.sqrt(1.0 * 50.0 / 4.0))
    self.assertIsNone(merge_report.lang_ratio(rows['specialist_a'], {}))

  def test_same_language_twice_is_refused(self):
    with tempfile.TemporaryDirectory() as tmp:
      c = _toy_config(tmp, tmp)
      c.merge.conlang_b_seed = c.data.conlang_seed
      with self.assertRaisesRegex(ValueError, 'merge.conlang_b_seed'):
        merge_run.run(c, os.path.join(tmp, 'work'))

  def test_toy_merge_end_to_end_and_resume(self):
    with tempfile.TemporaryDirectory() as tmp:
      src = os.path.join(tmp, 'src')
      testutil.make_tiny_hf(src, 'llama', seed=0)
      c = _toy_config(src, os.path.join(tmp, 'cache'))
      work = os.path.join(tmp, 'work')
      out = merge_run.run(c, work)
      rows = out['rows']
      self.assertSetEqual(set(rows), set(merge_run.expected_rows(c)))
      a, b = rows['specialist_a'], rows['specialist_b']
      # Two different specialists, each trained on its own language.
      self.assertNotEqual(out['info']['specialist_a']['dir'],
                          out['info']['specialist_b']['dir'])
      self.assertNotAlmostEqual(a['conlang_b_ppl'], b['conlang_b_ppl'],
                                places=4)
      self.assertNotAlmostEqual(a['conlang_a_ppl'],
                                rows['source']['conlang_a_ppl'], places=4)
      # The channel merges take the same number of channels from each
      # specialist at a rho; overlapping sets change fewer params.
      for rho in ('0.05', '0.2'):
        per_source = [rows[f'{f}@{rho}']['channels_per_source']
                      for f in ('act', 'random', 'weight_diff')]
        self.assertEqual(per_source[0], per_source[1])
        self.assertEqual(per_source[0], per_source[2])
        for f in ('act', 'random', 'weight_diff'):
          r = rows[f'{f}@{rho}']
          self.assertGreater(r['params_changed'], 0)
          self.assertGreaterEqual(r['conflicts'], 0)
      self.assertLess(rows['act@0.05']['params_changed'],
                      rows['act@0.2']['params_changed'])
      ov = out['analyses']['overlap']['0.05']
      self.assertBetween(ov['jaccard'], 0.0, 1.0)
      with open(os.path.join(work, 'report.md')) as f:
        text = f.read()
      self.assertIn('| act@0.05 |', text)
      self.assertIn('| ties@0.2 |', text)
      self.assertNotIn('PARTIAL', text)
      # A rerun resumes: same rows, both specialists from the cache.
      again = merge_run.run(c, work)
      self.assertEqual(json.dumps(again['rows'], sort_keys=True),
                       json.dumps(rows, sort_keys=True))
      self.assertTrue(again['info']['specialist_a']['cached'])
      self.assertTrue(again['info']['specialist_b']['cached'])


if __name__ == '__main__':
  absltest.main()
