"""The SmolLM2 case's data, and its whole pipeline at toy size.

The pipeline test runs `act_jax.smollm2.run.run` with `get_config('toy')` on
a tiny random Llama (real safetensors checkpoint, char tokenizer): every
stage runs for real (specialist training, statistics, transplants,
fine-tunes, baselines, analyses, report), only the sizes are small.
"""

import json
import os
import tempfile
from unittest import mock

from absl.testing import absltest
import numpy as np

from act_jax import checkpoint
from act_jax.smollm2 import conlang, corpus, models, qa, run, sweep
import testutil


def _toy_config(source: str, cache: str):
  return testutil.toy_case_config('smollm2_recover.py', source, cache)


class DataTest(absltest.TestCase):

  def test_conlang_is_deterministic_and_consistent(self):
    a = conlang.translate('The cat sat. The Cat!')
    self.assertEqual(a, conlang.translate('The cat sat. The Cat!'))
    words = a.replace('.', '').replace('!', '').split()
    self.assertEqual(words[1].lower(), words[4].lower())  # same word, same form
    self.assertTrue(words[0][0].isupper())
    self.assertNotIn('cat', a.lower())
    self.assertNotEqual(conlang.translate('cat', seed=1),
                        conlang.translate('cat', seed=0))

  def test_qa_halves_are_disjoint_and_cover(self):
    ev, tr = qa.split_items()
    qs_e, qs_t = {i.question for i in ev}, {i.question for i in tr}
    self.assertEmpty(qs_e & qs_t)
    self.assertLen(qs_e | qs_t, len(qa.all_items()))
    self.assertEqual({i.category for i in ev}, {i.category for i in tr})

  def test_answer_matching(self):
    self.assertTrue(qa.answer_matches('The capital is Paris.', ['Paris']))
    self.assertTrue(qa.answer_matches('  \nIt is 12 hours', ['12']))
    self.assertFalse(qa.answer_matches('It is 112', ['12']))
    self.assertFalse(qa.answer_matches('No idea\nParis', ['Paris']))

  def test_corpus_splits_are_disjoint_and_reproducible(self):
    cfg = corpus.CorpusConfig(english_eval_paragraphs=5,
                              conlang_eval_paragraphs=5,
                              english_probe_paragraphs=5,
                              conlang_train_paragraphs=20,
                              stdlib_docstrings=False)
    with tempfile.TemporaryDirectory() as d1, \
        tempfile.TemporaryDirectory() as d2:
      m1 = corpus.write_corpus(d1, cfg)
      m2 = corpus.write_corpus(d2, cfg)
      self.assertEqual(m1['files'], m2['files'])
      en_eval = {r['text'] for r in corpus.read_jsonl(
          os.path.join(d1, 'english_eval.jsonl'))}
      en_probe = {r['text'] for r in corpus.read_jsonl(
          os.path.join(d1, 'english_probe.jsonl'))}
      self.assertEmpty(en_eval & en_probe)
      train = corpus.read_jsonl(os.path.join(d1, 'conlang_train.jsonl'))
      self.assertLen(train, 20)
      self.assertNotIn({conlang.translate(t) for t in en_eval},
                       [{r['text'] for r in train}])

  def test_mask_overlap_helpers(self):
    a = {'s': np.array([[1, 1, 0, 0]], bool)}
    b = {'s': np.array([[0, 1, 1, 0]], bool)}
    self.assertAlmostEqual(sweep.overlap(a, b)['jaccard'], 1 / 3)
    self.assertAlmostEqual(sweep.overlap(a, a)['jaccard'], 1.0)
    # Expected intersection 2 * 2 / 4 = 1 -> 1 / (4 - 1).
    self.assertAlmostEqual(sweep.overlap(a, b)['random'], 1 / 3)
    conc = sweep.concentration({'s': np.array([[10.0, 0, 0, 0]])})
    self.assertAlmostEqual(conc['0.90']['median'], 0.25)


class SpecialistCacheTest(absltest.TestCase):

  def test_training_code_is_part_of_the_cache_key(self):
    with tempfile.TemporaryDirectory() as tmp:
      src = os.path.join(tmp, 'src')
      testutil.make_tiny_hf(src, 'llama', seed=0)
      tok = checkpoint.load_tokenizer(src)
      c = _toy_config(src, tmp)
      recs = [{'text': conlang.translate('the cat sat on the mat ' * 4)}] * 4
      args = (src, recs, tok, c.specialist, tmp, {'k': 1})
      d1, cached1 = models.specialist(*args)
      d2, cached2 = models.specialist(*args)
      self.assertEqual((d1, cached1, cached2), (d2, False, True))
      with mock.patch.object(models, 'code_digest', lambda: 'other code'):
        d3, cached3 = models.specialist(*args)
      self.assertNotEqual(d3, d1)
      self.assertFalse(cached3)
    self.assertLen(models.code_digest(), 16)


class PipelineTest(absltest.TestCase):

  def test_toy_run_end_to_end_and_resume(self):
    with tempfile.TemporaryDirectory() as tmp:
      src = os.path.join(tmp, 'src')
      testutil.make_tiny_hf(src, 'llama', seed=0)
      c = _toy_config(src, os.path.join(tmp, 'cache'))
      work = os.path.join(tmp, 'work')
      out = run.run(c, work)
      rows = out['rows']
      expected = {'source', 'specialist', 'linear@0.5', 'task_arith@0.5',
                  'ties@0.2', 'dare@0.9', 'full_ft', 'random@0.05+ft'}
      for rho in ('0.05', '0.2'):
        expected |= {f'random@{rho}', f'weight_diff@{rho}'}
        for s in ('mean_abs_diff', 'diff_of_mean_abs'):
          expected |= {f'act[{s}]@{rho}'}
          if rho == '0.05':  # compat.rhos in the toy config
            expected |= {f'act[{s}]@{rho}+ft'}
      self.assertSetEqual(set(rows), expected)
      for name, r in rows.items():
        self.assertBetween(r['qa_acc'], 0.0, 1.0, msg=name)
        self.assertTrue(np.isfinite(r['english_ppl']), msg=name)
      # Every channel selector moves the same number of params at a rho.
      for rho in ('0.05', '0.2'):
        moved = {rows[n]['params_moved'] for n in
                 (f'act[mean_abs_diff]@{rho}', f'act[diff_of_mean_abs]@{rho}',
                  f'random@{rho}', f'weight_diff@{rho}')}
        self.assertLen(moved, 1)
      self.assertLess(rows['act[mean_abs_diff]@0.05']['params_moved'],
                      rows['act[mean_abs_diff]@0.2']['params_moved'])
      # The specialist was trained, so it differs from the source.
      self.assertNotAlmostEqual(rows['source']['conlang_ppl'],
                                rows['specialist']['conlang_ppl'], places=4)
      ana = out['analyses']
      self.assertIn('0.80', ana['concentration']['mean_abs_diff'])
      for block in ('stability', 'overlap_act_vs_weight'):
        j = ana[block]['0.05']['mean_abs_diff']['jaccard']
        self.assertBetween(j, 0.0, 1.0)
      with open(os.path.join(work, 'report.md')) as f:
        text = f.read()
      self.assertIn('| act[mean_abs_diff]@0.05+ft |', text)
      self.assertIn('specialist_train', text)
      # A rerun resumes: same rows, the specialist comes from the cache.
      again = run.run(c, work)
      self.assertEqual(json.dumps(again['rows'], sort_keys=True),
                       json.dumps(rows, sort_keys=True))
      self.assertTrue(again['info']['specialist']['cached'])


if __name__ == '__main__':
  absltest.main()
