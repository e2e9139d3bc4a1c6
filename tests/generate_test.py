"""Tests for generate.py: KV-cache greedy decode vs recomputation and HF."""

import tempfile

from absl.testing import absltest
import jax
import numpy as np
import torch

from act_jax.model import forward
from act_jax.model import generate
from act_jax.io import hf
from act_jax.model import sharding
from tests import testutil


def recompute_greedy(params, cfg, tokens, mask, n):
  """Reference: a full forward over the growing sequence, token by token.

  The sequence lives right-padded in a fixed `[B, P + n]` buffer (padding
  after the last real token cannot change causal logits), so one jit serves
  every step.
  """
  b, p = tokens.shape
  buf = np.zeros((b, p + n), np.int32)
  buf_mask = np.zeros((b, p + n), np.int32)
  buf[:, :p], buf_mask[:, :p] = tokens, mask
  fwd = jax.jit(lambda t, m: forward.apply(params, t, cfg,
                                           attention_mask_bt=m).logits)
  out = []
  for i in range(n):
    logits = np.asarray(fwd(buf, buf_mask))
    nxt = logits[:, p + i - 1].argmax(-1).astype(np.int32)
    out.append(nxt)
    buf[:, p + i], buf_mask[:, p + i] = nxt, 1
  return np.stack(out, 1)


class GenerateTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.torch_model = testutil.make_tiny_hf(cls.tmp, 'qwen2', seed=3)
    cls.cfg, cls.params = hf.load_hf_params(cls.tmp)
    lens = [5, 9, 2, 7]
    ids = [testutil.random_tokens(1, n, cls.cfg.vocab_size, seed=i)[0]
           for i, n in enumerate(lens)]
    cls.tokens, cls.mask = generate.left_pad([list(x) for x in ids], 0, 1)

  def test_cache_equals_recompute_and_hf(self):
    n = 8
    ours = generate.greedy_generate(self.params, self.cfg, self.tokens,
                                    self.mask, max_new_tokens=n)
    ref = recompute_greedy(self.params, self.cfg, self.tokens, self.mask, n)
    np.testing.assert_array_equal(ours, ref)
    with torch.no_grad():
      hf = self.torch_model.generate(
          input_ids=torch.tensor(self.tokens, dtype=torch.long),
          attention_mask=torch.tensor(self.mask, dtype=torch.long),
          do_sample=False, max_new_tokens=n, min_new_tokens=n,
          eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(ours, hf[:, self.tokens.shape[1]:].numpy())
    # Sharded over 8 devices: same tokens.
    mesh = sharding.make_mesh((4, 2, 1))
    sharded = generate.greedy_generate(self.params, self.cfg, self.tokens,
                                       self.mask, max_new_tokens=n, mesh=mesh)
    np.testing.assert_array_equal(sharded, ours)
    # The scanned decode (no unrolled copy of the weights): same tokens.
    scanned = generate.greedy_generate(self.params, self.cfg, self.tokens,
                                       self.mask, max_new_tokens=n,
                                       unroll_decode=False)
    np.testing.assert_array_equal(scanned, ours)

  def test_eos_stops_and_matches_hf(self):
    free = generate.greedy_generate(self.params, self.cfg, self.tokens,
                                    self.mask, max_new_tokens=8)
    eos = int(free[0, 2])  # row 0 emits this at step 2: make it the EOS
    ours = generate.greedy_generate(self.params, self.cfg, self.tokens,
                                    self.mask, max_new_tokens=8, stop_ids=(eos,),
                                    pad_id=0)
    first = np.argmax(free == eos, axis=1)
    for r in range(len(ours)):
      if (free[r] == eos).any():
        np.testing.assert_array_equal(ours[r, :first[r] + 1],
                                      free[r, :first[r] + 1])
        self.assertTrue((ours[r, first[r] + 1:] == 0).all())
      else:
        np.testing.assert_array_equal(ours[r], free[r])
    with torch.no_grad():
      hf = self.torch_model.generate(
          input_ids=torch.tensor(self.tokens, dtype=torch.long),
          attention_mask=torch.tensor(self.mask, dtype=torch.long),
          do_sample=False, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    hf = hf[:, self.tokens.shape[1]:].numpy()
    np.testing.assert_array_equal(ours[:, :hf.shape[1]], hf)

  def test_text_and_errors(self):
    tok = testutil.make_tokenizer()
    texts = generate.generate_text(self.params, self.cfg, tok, ['ab', 'xyz1'],
                                   max_new_tokens=8, batch_size=4)
    self.assertLen(texts, 2)
    ids = [tok('ab')['input_ids'], tok('xyz1')['input_ids']]
    t, m = generate.left_pad(ids, 0)
    gen = generate.greedy_generate(self.params, self.cfg, t, m,
                                   max_new_tokens=8,
                                   stop_ids=tok.eos_token_id)
    row = gen[0].tolist()
    if tok.eos_token_id in row:
      row = row[:row.index(tok.eos_token_id)]
    self.assertEqual(texts[0], tok.decode(row, skip_special_tokens=True))
    with self.assertRaisesRegex(ValueError, 'left-padded'):
      generate.greedy_generate(self.params, self.cfg, [[5, 0]], [[1, 0]],
                               max_new_tokens=2)
    with self.assertRaisesRegex(ValueError, 'at least one token'):
      generate.left_pad([[1], []])


if __name__ == '__main__':
  absltest.main()
