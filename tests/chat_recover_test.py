"""A chat-model recover run through `act_jax.main`, checked against transformers.

Two tiny random Llama checkpoints with a chat template are a user's "own
pair of models"; their JSONL files are a QA ability (template chat, match
contains, a list of accepted answers per item) and an English ability that
is only evaluated. One run of `python -m act_jax.main --config=
configs/recover.py` with flags, then:
  - every per-item generation in the evaluation samples equals
    transformers' greedy `generate` on the same chat-rendered prompt (built
    by the tokenizer's own `apply_chat_template`), and the accuracy equals
    the same matching applied to transformers' replies;
  - the exported results load with `AutoModelForCausalLM.from_pretrained`
    (logits equal act-jax's) and `huggingface_hub.ModelCard.load`; the
    HF-named channel masks, applied in PyTorch to the target's tensors,
    rebuild the exported transplant exactly.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

from absl.testing import absltest
import huggingface_hub
import numpy as np
import torch
import transformers

from act_jax import data
from act_jax.eval import metrics as eval_metrics
from act_jax.io import models as models_io
from act_jax.model import forward
import testutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = [f'q{i} {w}?' for i, w in enumerate(
    ['sky', 'sea', 'sun', 'moon', 'star', 'rain', 'snow', 'wind'])]
MAX_NEW = 8
CAND_FT = 'act[mean_abs_diff]@0.2+ft'
CAND = 'act[mean_abs_diff]@0.2'


def hf_generate(model, tok, question):
  """transformers' greedy reply to `question` as a chat user turn."""
  ids = tok.apply_chat_template([{'role': 'user', 'content': question}],
                                add_generation_prompt=True, tokenize=True,
                                return_dict=False)
  with torch.no_grad():
    out = model.generate(torch.tensor([ids]), do_sample=False,
                         max_new_tokens=MAX_NEW, pad_token_id=0)
  return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def first_word(text):
  words = re.findall(r'[A-Za-z0-9]+', eval_metrics.first_line(text))
  return words[0] if words else None


class ChatRecoverTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    d = lambda *p: os.path.join(cls.tmp, *p)
    cls.src = d('source')
    cls.tgt = d('target')
    torch_src = testutil.make_tiny_hf(cls.src, seed=0, chat=True)
    testutil.make_tiny_hf(cls.tgt, seed=1, chat=True)
    cls.tok = models_io.load_tokenizer(cls.src)
    # Half of the items accept a word the source really answers, so the
    # accuracy is neither 0 nor 1 and the matching itself is exercised.
    recs = []
    for i, q in enumerate(QUESTIONS):
      word = first_word(hf_generate(torch_src, cls.tok, q))
      answers = [word, 'zzz'] if i % 2 == 0 and word else ['zzz']
      recs.append({'prompt': q, 'answer': answers[0], 'answers': answers})
    cls.records = recs
    data.write_jsonl(d('qa.jsonl'), recs)
    data.write_jsonl(d('en.jsonl'), [{'text': f'plain english {q}'}
                                     for q in QUESTIONS])
    cls.work = d('run')
    flags = {
        'models.source': cls.src, 'models.target': cls.tgt,
        'abilities.ability.probe': d('qa.jsonl'),
        'abilities.ability.eval': d('qa.jsonl'),
        'abilities.ability.sft': d('qa.jsonl'),
        'abilities.ability.template': 'chat',
        'abilities.ability.match': 'contains',
        'abilities.ability.max_new_tokens': MAX_NEW,
        'abilities.retain.eval': d('en.jsonl'),  # evaluated only
        'localize.top_frac': 0.2, 'sweep.selectors': 'act',
        'sweep.candidates': 'source,target', 'collect.max_seq_len': 64,
        'collect.batch_size': 8, 'train.num_steps': 2,
        'train.batch_size': 4, 'train.max_seq_len': 64,
        'train.save_every': 0, 'train.lr': 1e-2, 'sft.num_records': 8,
        'evaluate.num_eval': 8, 'evaluate.max_seq_len': 64,
        'report.bootstrap': 50, 'report.plots': False,
    }
    env = dict(os.environ, JAX_PLATFORMS='cpu', HF_HUB_OFFLINE='1')
    env.pop('XLA_FLAGS', None)
    p = subprocess.run(
        [sys.executable, '-m', 'act_jax.main',
         '--config=' + os.path.join(REPO, 'configs', 'recover.py'),
         '--workdir=' + cls.work, '--alsologtostderr'] +
        [f'--config.{k}={v}' for k, v in flags.items()],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    cls.log = p.stdout + p.stderr
    if p.returncode:
      raise AssertionError(f'main failed:\n{cls.log[-5000:]}')

  def _samples(self, cand, ability='ability'):
    path = os.path.join(self.work, 'evaluate', 'recover',
                        eval_metrics.samples_file(cand, ability))
    return testutil.read_jsonl(path)

  def test_generations_and_accuracy_equal_transformers(self):
    models = {'source': self.src, 'target': self.tgt,
              CAND: os.path.join(self.work, 'export', 'recover', 'act'),
              CAND_FT: os.path.join(self.work, 'export', 'recover', 'act_ft')}
    with open(os.path.join(self.work, 'evaluate', 'recover.json')) as f:
      table = json.load(f)['results']
    for cand, path in models.items():
      model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
      rows = self._samples(cand)
      self.assertLen(rows, len(QUESTIONS))
      want = [hf_generate(model, self.tok, r['prompt']) for r in
              self.records]
      self.assertEqual([r['generation'] for r in rows], want, cand)
      for r, rec in zip(rows, self.records):
        self.assertEqual(r['prompt'], self.tok.apply_chat_template(
            [{'role': 'user', 'content': rec['prompt']}],
            add_generation_prompt=True, tokenize=False))
        self.assertEqual(r['answers'], rec['answers'])
      acc = np.mean([eval_metrics.answer_correct(g, rec['answers'],
                                                 'contains')[1]
                     for g, rec in zip(want, self.records)])
      self.assertAlmostEqual(table[cand]['ability']['exact_match'], acc,
                             msg=cand)
      self.assertEqual([r['correct'] for r in rows], [
          eval_metrics.answer_correct(g, rec['answers'], 'contains')[1]
          for g, rec in zip(want, self.records)])
    # The source answers its accepted words: the matching is exercised.
    self.assertGreater(table['source']['ability']['exact_match'], 0)
    self.assertIn('ability 1/2 ability: 8 items', self.log)
    self.assertIn('items/s; candidate ETA', self.log)
    eng = self._samples('target', 'retain')
    self.assertEqual([r['doc_id'] for r in eng], list(range(8)))
    self.assertGreater(eng[0]['tokens'], 0)

  def test_export_loads_with_transformers_and_model_card(self):
    for result in ('act', 'act_ft'):
      out = os.path.join(self.work, 'export', 'recover', result)
      for f in ('model.safetensors', 'config.json', 'tokenizer.json',
                'generation_config.json', 'README.md', 'channel_masks.json'):
        self.assertTrue(os.path.isfile(os.path.join(out, f)), (result, f))
      stage = 'transfer' if result == 'act' else 'finetune'
      cfg, params = models_io.load_model(os.path.join(
          self.work, stage, 'recover', result))
      model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
      tokens = testutil.random_tokens(2, 12, cfg.vocab_size, seed=3)
      with torch.no_grad():
        want = model(torch.tensor(tokens)).logits.numpy()
      got = np.asarray(forward.apply(params, tokens, cfg).logits)
      np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
      card = huggingface_hub.ModelCard.load(os.path.join(out, 'README.md'))
      self.assertEqual(card.data.base_model, [self.tgt, self.src])
      self.assertEqual(card.data.tags, ['act-jax', 'merge'])
      self.assertEqual(card.data.library_name, 'transformers')
      self.assertIn('## Transferred channels', card.text)
      # The before/after table carries the report's intervals.
      self.assertRegex(card.text, r'\| target \| \d\.\d{3} \[\d\.\d{3}, ')
      self.assertIn(f'| {CAND_FT if result == "act_ft" else CAND} (this '
                    'model) |', card.text)
      self.assertEqual('## Fine-tune hyperparameters' in card.text,
                       result == 'act_ft')

  def test_hf_named_masks_rebuild_the_transplant_in_pytorch(self):
    out = os.path.join(self.work, 'export', 'recover', 'act')
    with open(os.path.join(out, 'channel_masks.json')) as f:
      masks = json.load(f)
    self.assertNotEmpty(masks)
    self.assertTrue(all(k.startswith('model.layers.') for k in masks))
    src = transformers.AutoModelForCausalLM.from_pretrained(
        self.src).state_dict()
    sd = transformers.AutoModelForCausalLM.from_pretrained(
        self.tgt).state_dict()
    for name, sel in masks.items():
      if 'rows' in sel:
        sd[name][sel['rows']] = src[name][sel['rows']]
      if 'cols' in sel:
        sd[name][:, sel['cols']] = src[name][:, sel['cols']]
    got = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, t in got.items():
      torch.testing.assert_close(t, sd[name], rtol=0, atol=0, msg=name)


if __name__ == '__main__':
  absltest.main()
