"""Tests for card.py: card contents and an HF export that loads back."""

import os
import tempfile

from absl.testing import absltest
import huggingface_hub
import jax
import numpy as np
import torch
import transformers

from act_jax.model import forward
from act_jax.io import hf
from act_jax.io import card
from act_jax.train import finetune
from tests import testutil


class ModelCardTest(absltest.TestCase):

  def test_card_and_export_roundtrip(self):
    src = tempfile.mkdtemp()
    testutil.make_tiny_hf(src, 'llama', seed=1)
    cfg, params = hf.load_hf_params(src)
    mask = {'self_attn.q_proj': np.zeros((2, cfg.q_dim), bool)}
    mask['self_attn.q_proj'][0, [1, 2, 3]] = True
    mask['self_attn.q_proj'][1, [4]] = True
    results = {'target': {'math': {'em': 0.1}},
               'result': {'math': {'em': 0.4}}}
    text = card.build_model_card(
        name='toy-act', cfg=cfg, sources={'math': '/ckpt/math'},
        target='/ckpt/lang', mask=mask,
        probe_data={'math': {'path': 'probe.jsonl', 'texts': 200}},
        finetune_data={'sources': [['math.jsonl', 0.5], ['lang.jsonl', 0.5]]},
        train_cfg=finetune.TrainConfig(lr=2e-5), results=results)
    self.assertIn('| self_attn.q_proj | [3, 1] | 4 | 128 | 0.0312 |', text)
    self.assertIn('| lr | 2e-05 |', text)
    self.assertIn('| result | 0.400 |', text)
    self.assertIn('probe.jsonl', text)
    with_ci = card.format_table({'target': {'math': {'em': (0.1, 0.05, 0.2)}}})
    self.assertIn('| target | 0.100 [0.050, 0.200] |', with_ci)
    out = os.path.join(tempfile.mkdtemp(), 'export')
    moved = jax.tree.map(lambda x: np.asarray(x) * 1.01, params)
    hub = card.hub_card(text, base_models=['org/base', '/ckpt/lang'])
    card.export_hf(moved, cfg, out, card=str(hub), tokenizer_dir=src)
    loaded = huggingface_hub.ModelCard.load(os.path.join(out, 'README.md'))
    self.assertEqual(loaded.data.base_model, ['org/base', '/ckpt/lang'])
    self.assertEqual(loaded.data.tags, ['act-jax', 'merge'])
    self.assertEqual(loaded.data.library_name, 'transformers')
    self.assertEqual(loaded.text.strip(), text.strip())
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = testutil.random_tokens(2, 7, cfg.vocab_size, seed=4)
    with torch.no_grad():
      want = model(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(forward.apply(moved, tokens, cfg).logits)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    self.assertTrue(os.path.exists(os.path.join(out, 'tokenizer.json')))


if __name__ == '__main__':
  absltest.main()
