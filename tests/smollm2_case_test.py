"""The SmolLM2 recover study's data, builder and whole pipeline at toy size.

The pipeline test runs `act_jax.main`'s pipeline with
`configs/smollm2_recover.py:toy` on a tiny random Llama (real safetensors
checkpoint, char tokenizer): every stage runs for real (the case build with
specialist training, statistics, the sweep of transplants and fine-tunes,
the baselines, analyses and report); only the sizes are small.
"""

import json
import os
import tempfile
from unittest import mock

from absl.testing import absltest
import numpy as np

from act_jax.cases.smollm2 import build
from act_jax.cases.smollm2 import conlang
from act_jax.cases.smollm2 import corpus
from act_jax.cases.smollm2 import qa
from act_jax.io import models as models_io
from act_jax.pipeline import run as run_lib
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
      read = lambda d, n: [r['text'] for r in testutil.read_jsonl(
          os.path.join(d, f'{n}.jsonl'))]
      en_eval, en_probe = read(d1, 'english_eval'), read(d1, 'english_probe')
      self.assertEmpty(set(en_eval) & set(en_probe))
      train = read(d1, 'conlang_train')
      self.assertLen(train, 20)
      self.assertEmpty({conlang.translate(t) for t in en_eval} & set(train))

  def test_languages_spec(self):
    self.assertEqual(build.languages('a:0, b:1'), [('a', 0), ('b', 1)])
    for bad in ('a:0,b:0', 'a', ''):
      with self.assertRaisesRegex(ValueError, 'case.languages'):
        build.languages(bad)


class SpecialistCacheTest(absltest.TestCase):

  def test_training_code_is_part_of_the_cache_key(self):
    with tempfile.TemporaryDirectory() as tmp:
      src = os.path.join(tmp, 'src')
      testutil.make_tiny_hf(src, 'llama', seed=0, chat=True)
      tok = models_io.load_tokenizer(src)
      c = _toy_config(src, tmp)
      recs = [{'text': conlang.translate('the cat sat on the mat ' * 4)}] * 4
      args = (src, recs, tok, c.case.specialist.to_dict(), tmp, {'k': 1})
      d1, cached1 = build.specialist(*args)
      d2, cached2 = build.specialist(*args)
      self.assertEqual((d1, cached1, cached2), (d2, False, True))
      with mock.patch.object(build, 'code_digest', lambda: 'other code'):
        d3, cached3 = build.specialist(*args)
      self.assertNotEqual(d3, d1)
      self.assertFalse(cached3)
    self.assertLen(build.code_digest(), 16)


class PipelineTest(absltest.TestCase):

  def test_toy_study_end_to_end_and_resume(self):
    with tempfile.TemporaryDirectory() as tmp:
      src = os.path.join(tmp, 'src')
      testutil.make_tiny_hf(src, 'llama', seed=0, chat=True)
      c = _toy_config(src, os.path.join(tmp, 'cache'))
      work = os.path.join(tmp, 'work')
      run_lib.run_pipeline(c, work)
      with open(os.path.join(work, 'evaluate', 'recover.json')) as f:
        rows = json.load(f)['results']
      expected = {'source', 'target', 'linear', 'task_arithmetic', 'ties',
                  'dare', 'full_ft', 'random@0.05+ft',
                  'act[mean_abs_diff]@0.05+ft'}
      for rho in ('0.05', '0.2'):
        expected |= {f'random@{rho}', f'weight_diff@{rho}',
                     f'act[mean_abs_diff]@{rho}'}
      self.assertSetEqual(set(rows), expected)
      for name, r in rows.items():
        self.assertBetween(r['qa']['exact_match'], 0.0, 1.0, msg=name)
        self.assertTrue(np.isfinite(r['english']['perplexity']), msg=name)
      moved = {}
      for name in rows:
        with open(os.path.join(work, 'evaluate', 'recover',
                               name + '.json')) as f:
          rec = json.load(f)
        moved[name] = rec['params_moved']
        # Per-item outcomes back every number (the report's intervals).
        self.assertLen(rec['metrics']['qa']['items'], 8)
      # Every channel selector moves the same number of params at a rho.
      for rho in ('0.05', '0.2'):
        self.assertLen({moved[n] for n in (
            f'act[mean_abs_diff]@{rho}', f'random@{rho}',
            f'weight_diff@{rho}')}, 1)
      self.assertLess(moved['act[mean_abs_diff]@0.05'],
                      moved['act[mean_abs_diff]@0.2'])
      # The specialist was trained, so it differs from the source.
      self.assertNotAlmostEqual(rows['source']['conlang']['perplexity'],
                                rows['target']['conlang']['perplexity'],
                                places=4)
      with open(os.path.join(work, 'localize', 'analysis.json')) as f:
        ana = json.load(f)
      key = 'recover/qa'
      self.assertIn('0.8', ana['concentration'][key]['mean_abs_diff'][
          'overall'])
      for block in ('stability', 'act_vs_weight'):
        j = ana[block][key]['0.05']['mean_abs_diff']['jaccard']
        self.assertBetween(j, 0.0, 1.0)
      with open(os.path.join(work, 'report.md')) as f:
        text = f.read()
      self.assertIn('| act[mean_abs_diff]@0.05+ft |', text)
      self.assertIn('| build_models |', text)
      # A rerun resumes: every stage skipped, the same rows.
      records = run_lib.run_pipeline(c, work)
      self.assertEqual(set(records), {
          'build_models', 'convert', 'collect', 'localize', 'transfer',
          'finetune', 'evaluate', 'report', 'export'})
      with open(os.path.join(work, 'evaluate', 'recover.json')) as f:
        self.assertEqual(json.load(f)['results'], rows)
      # A fresh workdir reuses the cached specialist.
      run_lib.run_pipeline(c, os.path.join(tmp, 'again'))
      with open(os.path.join(tmp, 'again', 'build_models',
                             'COMPLETE.json')) as f:
        summary = json.load(f)['summary']
      self.assertTrue(summary['specialists']['a']['cached'])


if __name__ == '__main__':
  absltest.main()
