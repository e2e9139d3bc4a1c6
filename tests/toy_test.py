"""The toy abilities, tokenizer, batches and metrics of the demo."""

import tempfile

from absl.testing import absltest
import jax
import numpy as np
import transformers

from act_jax import data
from act_jax.cases.toy import abilities
from act_jax.cases.toy import batches
from act_jax.cases.toy import build
from act_jax.cases.toy import tokenizer
from act_jax.eval import metrics as eval_metrics
from act_jax.model import forward
from act_jax.model.config import ModelConfig


def _tok():
  d = tempfile.mkdtemp()
  tokenizer.make_tokenizer(d)
  return transformers.AutoTokenizer.from_pretrained(d)


def _tiny_cfg():
  return ModelConfig(model_type='llama', vocab_size=tokenizer.vocab_size(),
                     hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=2, num_kv_heads=1, head_dim=16,
                     max_position_embeddings=64)


class AbilitiesTest(absltest.TestCase):

  def test_records_are_correct_and_seeded(self):
    for r in abilities.records('arithmetic', 50, 0):
      a, b = r['prompt'][:-1].split('+')
      self.assertEqual(int(a) + int(b), int(r['answer']))
      self.assertEqual(r['text'], r['prompt'] + r['answer'])
    for r in abilities.records('reverse', 50, 0):
      self.assertEqual(r['prompt'][:-1][::-1], r['answer'])
    self.assertEqual(abilities.records('lang_a', 5, 3),
                     abilities.records('lang_a', 5, 3))
    self.assertNotEqual(abilities.records('lang_a', 5, 3),
                        abilities.records('lang_a', 5, 4))

  def test_languages_have_disjoint_letters(self):
    def letters(name):
      return {ch for r in abilities.records(name, 200, 0)
              for ch in r['text'] if ch.isalpha()}
    self.assertEmpty(letters('lang_a') & letters('lang_b'))

  def test_unknown_ability_is_named(self):
    with self.assertRaisesRegex(KeyError, 'flying'):
      abilities.get('flying')
    with self.assertRaisesRegex(KeyError, 'flying'):
      build.parse_weights('arithmetic:1,flying:2')


class TokenizerBatchesTest(absltest.TestCase):

  def test_hf_tokenizer_matches_fast_path_and_adds_bos(self):
    d = tempfile.mkdtemp()
    tokenizer.make_tokenizer(d)
    tok = transformers.AutoTokenizer.from_pretrained(d)
    text = '37+8=45 kamu.'
    self.assertEqual(tok(text)['input_ids'],
                     [tokenizer.BOS_ID] + tokenizer.encode(text))
    self.assertEqual(tokenizer.decode(tokenizer.encode(text)), text)

  def test_scoring_counts_answer_and_eos_only(self):
    recs = [{'prompt': '1+2=', 'answer': '3', 'text': '1+2=3'}]
    b = data.load_batches(build.eval_data_config(12), _tok(), recs)[0][0]
    ids = b['tokens_bt'][0]
    scored = ids[b['token_mask_bt'][0] > 0].tolist()
    self.assertEqual(scored, tokenizer.encode('3') + [tokenizer.EOS_ID])
    self.assertEqual(ids[:6].tolist(), [tokenizer.BOS_ID] +
                     tokenizer.encode('1+2=3'))

  def test_packing_keeps_examples_whole(self):
    recs = abilities.records('arithmetic', 40, 0)
    arr = batches.pack_records(recs, 32)
    for row, att in zip(arr['tokens_bt'], arr['attention_mask_bt']):
      real = row[att > 0].tolist()
      self.assertEqual(real[0], tokenizer.BOS_ID)
      self.assertEqual(real[-1], tokenizer.EOS_ID)
    self.assertTrue((arr['loss_mask_bt'][:, 0] == 0).all())


class MetricsTest(absltest.TestCase):

  def test_greedy_matches_a_step_by_step_loop(self):
    cfg = _tiny_cfg()
    params = forward.init_params(cfg, jax.random.key(1))
    params = jax.tree.map(lambda x: x * 20, params)  # peaky logits
    prompts = ['12+3=', 'ABC>', '7+1=']
    tok = _tok()
    items = data.generation_items(
        [{'prompt': p, 'answer': '0'} for p in prompts], tok,
        build.eval_data_config(32))
    res = eval_metrics.generation(params, cfg, tok, items, max_new_tokens=4)
    for p, g in zip(prompts, [i['generation'] for i in res['items']]):
      ids = [tokenizer.BOS_ID] + tokenizer.encode(p)
      for _ in range(4):
        logits = forward.apply(params, np.asarray([ids]), cfg).logits
        ids.append(int(np.argmax(logits[0, -1])))
      self.assertEqual(g, tokenizer.decode(ids[1 + len(tokenizer.encode(
          p)):]))

  def test_perplexity_of_random_model_is_near_vocab_size(self):
    cfg = _tiny_cfg()
    params = forward.init_params(cfg, jax.random.key(0))
    recs = abilities.records('lang_a', 8, 0)
    batch = data.load_batches(build.eval_data_config(48), _tok(), recs)[0]
    ppl = eval_metrics.perplexity(params, cfg, batch)['ppl']
    self.assertBetween(ppl, 0.5 * cfg.vocab_size, 2.0 * cfg.vocab_size)


if __name__ == '__main__':
  absltest.main()
