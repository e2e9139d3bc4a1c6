"""A user's own data through the pipeline's data steps.

The compatibility fine-tune's mixture takes text, qa and chat SFT records
(each rendered by its own ability), splits `retain_weight` evenly among the
retained abilities as `SftConfig` documents, and leaves out an ability that
is only evaluated; every selector pre-flight accepts produces masks.
"""

import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from act_jax import data
from act_jax.io import hf
from act_jax.pipeline import candidates as cand_lib
from act_jax.pipeline import jobs
from act_jax.pipeline import stages
import testutil


def _write(path, records):
  data.write_jsonl(path, records)
  return path


class SftMixtureTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()
    d = lambda n: os.path.join(self.tmp, n)
    c = jobs.default_config()
    c.models.src, c.models.tgt = '/ckpt/a', '/ckpt/b'
    c.recover.source, c.recover.target, c.recover.ability = 'src', 'tgt', 'qa'
    c.abilities.qa = jobs.ability(
        template='qa', qa_format='Q: {prompt}\nA: {response}',
        sft=_write(d('qa.jsonl'), [{'prompt': f'{i}+1?', 'answer': 'qa'}
                                   for i in range(5)]))
    c.abilities.chat = jobs.ability(
        template='chat', sft=_write(d('chat.jsonl'), [
            {'prompt': f'hi {i}', 'answer': 'chat'} for i in range(5)]))
    c.abilities.text = jobs.ability(
        template='text', sft=_write(d('text.jsonl'), [
            {'text': f'plain text {i}'} for i in range(5)]))
    c.abilities.english = jobs.ability(template='text', eval=d('text.jsonl'))
    c.sft.num_records = 40
    c.train.max_seq_len = 32
    c.train.batch_size = 4
    self.plan = jobs.plan_from_config(c, self.tmp)
    self.tok = testutil.make_tokenizer(chat=True)

  def test_text_qa_and_chat_records_split_as_documented(self):
    batches, info = stages.sft_batches(self.plan, self.plan.jobs[0], self.tok)
    weights = {a: s['weight'] for a, s in info['sources'].items()}
    # The moved ability gets ability_weight; retain_weight is split evenly
    # among the other abilities with SFT data; eval-only abilities get none.
    self.assertEqual(weights, {'qa': 0.5, 'chat': 0.25, 'text': 0.25})
    seen = {'qa': 0, 'chat': 0, 'text': 0}
    for b in batches:
      for row, real, resp in zip(b['tokens_bt'], b['attention_mask_bt'],
                                 b['token_mask_bt']):
        if not real.any():
          continue
        full = self.tok.decode(row[real == 1])
        target = self.tok.decode(row[resp == 1])
        if full.startswith('Q: '):
          # qa: the loss is on the answer and the EOS only.
          self.assertEqual(target, 'qa</s>')
          seen['qa'] += 1
        elif full.startswith('<user>'):
          self.assertEqual(target, 'chat</s>')  # the turn's own end
          seen['chat'] += 1
        else:
          self.assertRegex(full, r'^plain text \d$')
          self.assertEqual(target, full)  # every text token
          seen['text'] += 1
    self.assertEqual(seen, {'qa': 20, 'chat': 10, 'text': 10})

  def test_no_sft_data_is_a_named_error(self):
    plan = self.plan
    abilities = {n: a for n, a in plan.abilities.items() if n == 'english'}
    bare = jobs.Plan(**{**{f: getattr(plan, f) for f in
                          plan.__dataclass_fields__}, 'abilities': abilities})
    with self.assertRaisesRegex(jobs.ConfigError, 'no ability has SFT data'):
      stages.sft_batches(bare, plan.jobs[0], self.tok)


class SelectionTest(parameterized.TestCase):

  @parameterized.parameters(
      dict(select='per_site'), dict(select='global'),
      dict(select='threshold', threshold=0.5), dict(select='mass', mass=0.5))
  def test_every_selector_preflight_accepts_runs(self, **loc):
    d = tempfile.mkdtemp()
    testutil.make_tiny_hf(d, seed=0, tokenizer=False)
    cfg = hf.load_hf_config(d)
    rng = np.random.default_rng(0)
    shapes = {'mlp.up_proj': (2, 96), 'self_attn.q_proj': (2, 64)}
    act = {'mean_abs_diff': {s: rng.random(sh) for s, sh in shapes.items()}}
    wd = {s: rng.random(sh) for s, sh in shapes.items()}
    lc = jobs.LocalizeConfig(**loc)
    counts = {}
    for kind in jobs.SELECTORS:
      m, _ = cand_lib.channel_masks(kind, 'mean_abs_diff', 0.05,
                                    act_scores=act, weight_scores=wd, loc=lc,
                                    cfg=cfg, seed=0)
      counts[kind] = {s: m[s].sum(-1).tolist() for s in shapes}
    # Random and weight-diff channels match the ACT mask's budget.
    self.assertEqual(counts['random'], counts['act'])
    self.assertEqual(counts['weight_diff'], counts['act'])
    self.assertGreater(sum(map(sum, counts['act'].values())), 0)


if __name__ == '__main__':
  absltest.main()
