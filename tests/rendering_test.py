"""One rendering per ability: probe, fine-tune and evaluation agree.

The same record is turned into a probe row, an SFT row, a perplexity row
and a generation prompt through `stages.data_config` (how the pipeline
derives every use from one ability) for each template, with the char
tokenizer of the tests and with SmolLM2's real byte-level BPE tokenizer and
chat template; every use must agree token for token up to the response, and
the generation prompt must be exactly what transformers itself builds.
"""

from absl.testing import absltest
from absl.testing import parameterized

from act_jax import data
from act_jax.cases.smollm2 import weights
from act_jax.io import models as models_io
from act_jax.pipeline import jobs
from act_jax.pipeline import stages
import testutil

RECORD = {'prompt': 'What is the capital of France?', 'answer': 'Paris',
          'text': 'Paris is the capital of France.'}
QA_FORMAT = 'Question: {prompt}\nAnswer: {response}'


def _tokenizers():
  return {'char': testutil.make_tokenizer(chat=True),
          'smollm2': models_io.load_tokenizer(weights.smollm2_hf_dir())}


class RenderingTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.toks = _tokenizers()

  def _uses(self, tok, template):
    a = jobs.Ability(name='x', template=template, qa_format=QA_FORMAT,
                     prompt_field='prompt', response_field='answer')
    out = {}
    for use in ('probe', 'sft', 'eval'):
      cfg = stages.data_config(a, use, 128)
      out[use] = data.tokenize_records([RECORD], tok, cfg).examples[0]
    if template != 'text':
      out['gen'] = data.generation_items([RECORD], tok, stages.data_config(
          a, 'eval', 128))[0]
    return out

  @parameterized.parameters('char', 'smollm2')
  def test_qa_uses_agree_and_prompt_is_the_rendered_prompt(self, name):
    tok = self.toks[name]
    u = self._uses(tok, 'qa')
    prompt = 'Question: What is the capital of France?\nAnswer: '
    # The generation prompt: the rendered prompt (real newline), tokenized
    # as transformers' generate would get it.
    self.assertEqual(u['gen']['prompt'], prompt)
    self.assertEqual(u['gen']['prompt_ids'], tok(prompt)['input_ids'])
    n = len(u['gen']['prompt_ids'])
    for use in ('probe', 'sft', 'eval'):
      ids = u[use].ids.tolist()
      self.assertEqual(ids[:n], u['gen']['prompt_ids'], use)
      self.assertEqual(tok.decode(ids, skip_special_tokens=True),
                       prompt + 'Paris', use)
    # Probe rows have no EOS; fine-tune and eval rows end with it.
    self.assertEqual(u['sft'].ids.tolist(),
                     u['probe'].ids.tolist() + [tok.eos_token_id])
    self.assertEqual(u['eval'].ids.tolist(), u['sft'].ids.tolist())
    resp = u['sft'].response.tolist()
    self.assertEqual(resp, [0] * n + [1] * (len(resp) - n))
    self.assertEqual(tok.decode(u['sft'].ids[n:], skip_special_tokens=True),
                     'Paris')

  @parameterized.parameters('char', 'smollm2')
  def test_chat_uses_agree_with_the_tokenizers_own_template(self, name):
    tok = self.toks[name]
    u = self._uses(tok, 'chat')
    user = [{'role': 'user', 'content': RECORD['prompt']}]
    want = tok.apply_chat_template(user, add_generation_prompt=True,
                                   tokenize=True, return_dict=False)
    self.assertEqual(u['gen']['prompt_ids'], list(want))
    full = tok.apply_chat_template(
        user + [{'role': 'assistant', 'content': 'Paris'}], tokenize=True,
        return_dict=False)
    n = len(want)
    for use in ('probe', 'sft', 'eval'):
      # A chat template ends the turn itself: no extra EOS for any use.
      self.assertEqual(u[use].ids.tolist(), list(full), use)
      self.assertEqual(u[use].response.tolist(),
                       [0] * n + [1] * (len(full) - n), use)
    self.assertStartsWith(tok.decode(u['sft'].ids[n:]), 'Paris')

  @parameterized.parameters('char', 'smollm2')
  def test_text_is_plain_lm_loss_on_the_whole_text(self, name):
    tok = self.toks[name]
    u = self._uses(tok, 'text')
    want = tok(RECORD['text'])['input_ids']
    for use in ('probe', 'sft', 'eval'):
      self.assertEqual(u[use].ids.tolist(), want, use)
      real = [int(t not in tok.all_special_ids) for t in want]
      self.assertEqual(u[use].response.tolist(), real, use)
    with self.assertRaisesRegex(data.DataError, 'no prompt to generate'):
      data.generation_items([RECORD], tok, data.DataConfig(template='text'))


  def test_shipped_qa_formats_have_real_newlines(self):
    for name in ('recover.py', 'merge.py'):
      c = testutil.load_config(name)
      for ability, a in c.abilities.items():
        if a.template == 'qa':
          text, _ = data.render(RECORD, 'qa', prompt_field='prompt',
                                response_field='answer',
                                qa_format=a.qa_format)
          self.assertNotIn('\\n', text, f'{name} {ability}')
          self.assertIn('\n', text, f'{name} {ability}')


if __name__ == '__main__':
  absltest.main()
