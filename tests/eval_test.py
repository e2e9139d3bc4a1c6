"""Tests for eval_metrics.py against transformers' PyTorch model as the oracle."""

import tempfile

from absl.testing import absltest
import numpy as np
import torch

from act_jax import data
from act_jax.eval import metrics as eval_metrics
from act_jax.io import card
from act_jax.io import hf
from act_jax.model import sharding
from tests import testutil


def torch_seq_logprob(model, prompt, choice):
  ids = torch.tensor([prompt + choice])
  with torch.no_grad():
    logits = model(input_ids=ids).logits[0].double()
  lp = torch.log_softmax(logits, -1)
  return sum(float(lp[len(prompt) + j - 1, t]) for j, t in enumerate(choice))


class EvaluateTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.torch_model = testutil.make_tiny_hf(cls.tmp, 'llama', seed=5)
    cls.cfg, cls.params = hf.load_hf_params(cls.tmp)
    cls.mesh = sharding.make_mesh((4, 2, 1))

  def test_perplexity_equals_torch(self):
    tokens = testutil.random_tokens(6, 16, self.cfg.vocab_size, seed=1)
    attn = np.ones_like(tokens)
    attn[2, 11:] = 0  # right padding
    attn[4, 5:] = 0
    loss_mask = attn.copy()
    loss_mask[:, :4] = 0  # prompt tokens do not count
    labels = np.where(loss_mask == 1, tokens, -100)
    with torch.no_grad():
      loss = self.torch_model(
          input_ids=torch.tensor(tokens), attention_mask=torch.tensor(attn),
          labels=torch.tensor(labels)).loss
    # Two batches of 3 rows (batch axes of 8 devices: padded with empty rows)
    batches = [{'tokens_bt': tokens[i:i + 3], 'attention_mask_bt':
                attn[i:i + 3], 'loss_mask_bt': loss_mask[i:i + 3]}
               for i in (0, 3)]
    r = eval_metrics.perplexity(self.params, self.cfg, batches, mesh=self.mesh)
    self.assertEqual(r['tokens'], float((labels[:, 1:] != -100).sum()))
    np.testing.assert_allclose(r['ppl'], float(torch.exp(loss)), rtol=1e-4)
    with self.assertRaisesRegex(ValueError, 'no target tokens'):
      eval_metrics.perplexity(self.params, self.cfg, [dict(
          batches[0], loss_mask_bt=np.zeros_like(tokens[:3]))])

  def test_packed_rows_equal_separate_rows(self):
    rng = np.random.RandomState(3)
    exs = [data.Example(rng.randint(4, self.cfg.vocab_size, n).astype(
        np.int32), np.ones(n, np.int32)) for n in (5, 7, 4, 6)]
    packed = data.make_batches(exs, 2, 16, pack=True)
    separate = data.make_batches(exs, 4, 16, pack=False)
    self.assertLess(packed[0]['attention_mask_bt'].sum(-1).min(), 16)
    a = eval_metrics.perplexity(self.params, self.cfg, packed, mesh=self.mesh)
    b = eval_metrics.perplexity(self.params, self.cfg, separate, mesh=self.mesh)
    self.assertEqual(a['tokens'], b['tokens'])  # no cross-document targets
    np.testing.assert_allclose(a['nll'], b['nll'], rtol=1e-5)

  def test_mc_accuracy_constructed(self):
    rng = np.random.RandomState(0)
    v = self.cfg.vocab_size
    items, want = [], 0
    for i in range(6):
      prompt = list(rng.randint(4, v, 5 + i % 3))
      choices = [list(rng.randint(4, v, n)) for n in (1, 3, 2)]
      lp = np.array([torch_seq_logprob(self.torch_model, prompt, c)
                     for c in choices])
      best = int(np.argmax(lp))
      answer = best if i % 3 else (best + 1) % 3  # 4 right, 2 wrong
      want += answer == best
      items.append({'prompt': prompt, 'choices': choices, 'answer': answer,
                    'lp': lp})
    r = eval_metrics.mc_accuracy(self.params, self.cfg, items, batch_size=8,
                                 mesh=self.mesh)
    self.assertAlmostEqual(r['acc'], want / 6)
    scores = eval_metrics.choice_scores(self.params, self.cfg, items,
                                        mesh=self.mesh)
    for it, (s, n) in zip(items, scores):
      np.testing.assert_allclose(s, it['lp'], rtol=1e-4, atol=1e-4)
      np.testing.assert_array_equal(n, [1, 3, 2])
    # Length normalization ranks by mean log-prob instead.
    mean_right = sum(int(np.argmax(it['lp'] / [1, 3, 2]) == it['answer'])
                     for it in items)
    r = eval_metrics.mc_accuracy(self.params, self.cfg, items, norm='mean',
                                 mesh=self.mesh)
    self.assertAlmostEqual(r['acc'], mean_right / 6)
    with self.assertRaisesRegex(ValueError, 'answer 5'):
      eval_metrics.mc_accuracy(self.params, self.cfg, [dict(items[0], answer=5)])

  def test_extraction(self):
    self.assertEqual(eval_metrics.extract_answer('so 3 + 4 = 7, total 1,200.',
                                                 'last_number'), '1,200')
    self.assertEqual(eval_metrics.normalize_answer('1,200'), '1200')
    self.assertEqual(eval_metrics.normalize_answer(' 12.50 '), '12.5')
    self.assertEqual(eval_metrics.extract_answer('work\n#### 42\nmore',
                                                 'hash'), '42')
    self.assertEqual(eval_metrics.extract_answer(
        'Answer: (B) yes', 'regex', r'\(([A-D])\)'), 'B')
    self.assertIsNone(eval_metrics.extract_answer('no digits', 'last_number'))
    self.assertEqual(eval_metrics._gold('steps #### 1,000', 'last_number'),
                     '1000')
    with self.assertRaisesRegex(ValueError, 'match=.fuzzy'):
      eval_metrics.extract_answer('x', 'fuzzy')

  def test_answer_matching(self):
    ok = lambda r, a, m='contains', p='': eval_metrics.answer_correct(
        r, a, m, p)[1]
    # contains: whole words of an accepted answer in the first line.
    self.assertTrue(ok('The capital is Paris.', ['Paris']))
    self.assertTrue(ok('  \nIt is 12 hours', ['12']))
    self.assertFalse(ok('It is 112', ['12']))
    self.assertFalse(ok('No idea\nParis', ['Paris']))
    self.assertTrue(ok('berne, of course', ['Bern', 'Berne']))
    # exact: normalized whole reply; numbers compare as numbers.
    self.assertTrue(ok(' 1,000. ', ['1000'], 'exact'))
    self.assertFalse(ok('1000 apples', ['1000'], 'exact'))
    self.assertTrue(ok('so it is 7', ['#### 7'], 'last_number'))
    self.assertTrue(ok('x\n#### 7\n', ['7'], 'hash'))
    self.assertTrue(ok('Answer: (C)', ['c'], 'regex', r'\(([A-D])\)'))
    self.assertFalse(ok('nothing', ['7'], 'last_number'))
    # contains over a span (the first N reply tokens): every line of it.
    self.assertTrue(eval_metrics.answer_correct(
        'No idea\nParis', ['Paris'], 'contains', span='No idea\nParis')[1])
    with self.assertRaisesRegex(ValueError, 'only searched by'):
      eval_metrics.answer_correct('7', ['7'], 'exact', span='7')

  def test_contains_tokens_searches_the_first_n_reply_tokens(self):
    tok = testutil.make_tokenizer()
    ids = tok('ab')['input_ids']
    reply = eval_metrics.generation(
        self.params, self.cfg, tok, [{'prompt_ids': ids, 'answers': ['x']}],
        max_new_tokens=8, mesh=self.mesh)['items'][0]['generation']
    words = [w for w in ''.join(c if c.isalnum() else ' ' for c in
                                reply).split()]
    self.assertNotEmpty(words, reply)
    last = words[-1]  # char tokenizer: N tokens = N characters
    n_last = reply.rindex(last) + len(last)
    item = [{'prompt_ids': ids, 'answers': [last], 'prompt': 'ab'}]
    got = {n: eval_metrics.generation(
        self.params, self.cfg, tok, item, match='contains',
        contains_tokens=n, max_new_tokens=8, mesh=self.mesh)['items'][0]
           for n in (n_last, n_last - 1)}
    self.assertEqual(got[n_last]['extracted'], reply[:n_last])
    self.assertTrue(got[n_last]['correct'])
    self.assertFalse(got[n_last - 1]['correct'])
    self.assertEqual(got[n_last]['answers'], [last])
    with self.assertRaisesRegex(ValueError, 'contains_tokens'):
      eval_metrics.generation(self.params, self.cfg, tok, item,
                              match='exact', contains_tokens=2)

  def test_metrics_items_and_table(self):
    tok = testutil.make_tokenizer()
    src = self.params
    _, other = hf.load_hf_params(self._other_model())
    ids = tok('ab')['input_ids']
    gen0 = eval_metrics.generation(
        src, self.cfg, tok, [{'prompt_ids': ids, 'answers': ['x']}],
        max_new_tokens=4, mesh=self.mesh)['items'][0]['generation']
    items = [{'prompt_ids': ids, 'answers': [gen0], 'prompt': 'ab'},
             {'prompt_ids': ids, 'answers': [gen0 + 'zz'], 'prompt': 'ab'}]
    g = eval_metrics.generation(src, self.cfg, tok, items, max_new_tokens=4,
                                mesh=self.mesh)
    self.assertAlmostEqual(g['acc'], 0.5)
    self.assertEqual([i['correct'] for i in g['items']], [True, False])
    self.assertEqual(g['items'][0]['prompt'], 'ab')
    tokens = testutil.random_tokens(8, 12, self.cfg.vocab_size, seed=2)
    ones = np.ones_like(tokens)
    batch = [{'tokens_bt': tokens, 'attention_mask_bt': ones,
              'token_mask_bt': ones}]
    res = {}
    for name, p in (('source', src), ('target', other)):
      r = eval_metrics.perplexity(p, self.cfg, batch, mesh=self.mesh)
      # Per-item (row) outcomes add up to the totals.
      self.assertLen(r['items']['nll'], 8)
      self.assertAlmostEqual(sum(r['items']['tokens']), r['tokens'])
      self.assertAlmostEqual(np.exp(sum(r['items']['nll']) / r['tokens']),
                             r['ppl'], places=4)
      mc = eval_metrics.mc_accuracy(
          p, self.cfg, [{'prompt': 'abc', 'choices': ['d', 'ef'],
                         'answer': 0}], tokenizer=tok, mesh=self.mesh)
      res[name] = {'skill': {'ppl': r['ppl'], 'mc_acc': mc['acc']}}
    self.assertNotAlmostEqual(res['source']['skill']['ppl'],
                              res['target']['skill']['ppl'])
    table = card.format_table(res)
    self.assertIn('| source |', table)
    self.assertIn('skill ppl', table)
    self.assertLen(table.splitlines(), 4)

  def _other_model(self):
    d = tempfile.mkdtemp()
    testutil.make_tiny_hf(d, 'llama', seed=6, tokenizer=False)
    return d


if __name__ == '__main__':
  absltest.main()
