"""Converted tiny HF models give transformers' PyTorch logits; model invariants.

Each case saves a random tiny transformers model with `save_pretrained`,
converts it with `hf.load_hf_params` and compares logits on one
padded batch: a full row, a right-padded row and a left-padded row (torch gets
explicit `position_ids = cumsum(mask) - 1`, which is also our default).
One jitted forward is compiled per config and reused by the invariant tests.
"""

import functools
import shutil
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import testutil
import torch

from act_jax.model import capture as capture_lib
from act_jax.model import forward
from act_jax.model import losses
from act_jax.io import hf
from act_jax.model import decoder as model_lib

TOL = 1e-4  # fp32 logits, transformers vs act-jax
BATCH, LENGTH = 3, 24
LLAMA3_ROPE = dict(rope_type='llama3', rope_theta=10000.0, factor=8.0,
                   low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)
WINDOW = 8  # mistral sliding window, shorter than LENGTH

CASES = (
    ('llama_mha', 'llama', dict(num_key_value_heads=4)),
    ('llama_gqa', 'llama', {}),
    ('llama_mqa', 'llama', dict(num_key_value_heads=1)),
    ('llama_bias_mha', 'llama',
     dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True)),
    ('llama3_rope_gqa', 'llama', dict(rope_parameters=LLAMA3_ROPE)),
    ('llama3_rope_mha', 'llama',
     dict(rope_parameters=LLAMA3_ROPE, num_key_value_heads=4)),
    ('qwen2_tied_gqa', 'qwen2', dict(tie_word_embeddings=True)),
    ('qwen2_tied_mha', 'qwen2',
     dict(tie_word_embeddings=True, num_key_value_heads=4)),
    ('mistral_window_gqa', 'mistral', dict(sliding_window=WINDOW)),
    ('mistral_window_mha', 'mistral',
     dict(sliding_window=WINDOW, num_key_value_heads=4)),
    ('mistral_window_mqa', 'mistral',
     dict(sliding_window=WINDOW, num_key_value_heads=1)),
    ('qwen3_gqa', 'qwen3', {}),
    ('qwen3_mha', 'qwen3', dict(num_key_value_heads=4)),
)


@functools.partial(jax.jit, static_argnames=('cfg', 'capture'))
def _forward(params, tokens_bt, mask_bt, cfg, capture=None):
  out = forward.apply(params, tokens_bt, cfg, attention_mask_bt=mask_bt,
                      capture=capture)
  return out.logits, out.stats


@functools.partial(jax.jit, static_argnames=('cfg', 'layer_major'))
def _forward_models(stacked, tokens_bt, mask_bt, cfg, layer_major=False):
  return forward.apply_models(stacked, tokens_bt, cfg,
                              attention_mask_bt=mask_bt,
                              layer_major=layer_major).logits


def padded_batch(vocab: int) -> tuple[np.ndarray, np.ndarray]:
  """Tokens and mask: row 0 full, row 1 right-padded, row 2 left-padded."""
  tokens = testutil.random_tokens(BATCH, LENGTH, vocab, seed=1)
  mask = np.ones((BATCH, LENGTH), np.int32)
  mask[1, LENGTH - 7:] = 0
  mask[2, :5] = 0
  tokens = np.where(mask == 1, tokens, 0)  # pad id 0
  return tokens, mask


def torch_logits(model, tokens, mask) -> np.ndarray:
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens),
                attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(positions))
  return out.logits.float().numpy()


def max_diff_on_tokens(a, b, mask) -> float:
  return float(np.abs(np.asarray(a) - np.asarray(b))[mask == 1].max())


class TransformersParityTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp(prefix='model_test_')

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  @parameterized.named_parameters(*CASES)
  def test_logits_match_transformers(self, family, overrides):
    hf_dir = tempfile.mkdtemp(dir=self.root)
    model = testutil.make_tiny_hf(hf_dir, family, seed=0, tokenizer=False,
                                  **overrides)
    cfg, params = hf.load_hf_params(hf_dir)
    tokens, mask = padded_batch(cfg.vocab_size)
    ours, _ = _forward(params, tokens, mask, cfg)
    ref = torch_logits(model, tokens, mask)
    diff = max_diff_on_tokens(ours, ref, mask)
    print(f'{family} {overrides}: max |logit diff| = {diff:.2e}')
    self.assertLess(diff, TOL)

  def test_llama3_scaling_changes_frequencies(self):
    # The llama3 cases above would be vacuous if scaling did nothing here.
    hf_dir = tempfile.mkdtemp(dir=self.root)
    testutil.tiny_hf_config('llama', rope_parameters=LLAMA3_ROPE
                           ).save_pretrained(hf_dir)
    cfg = hf.load_hf_config(hf_dir)
    self.assertEqual(cfg.rope_type, 'llama3')
    scaled = np.asarray(model_lib.rope_inv_freq(cfg))
    plain = np.asarray(model_lib.rope_inv_freq(cfg.replace(
        rope_type='default')))
    self.assertGreater(int(np.sum(np.abs(scaled - plain) > 1e-6)), 2)

  def test_mistral_window_matters(self):
    hf_dir = tempfile.mkdtemp(dir=self.root)
    testutil.make_tiny_hf(hf_dir, 'mistral', tokenizer=False,
                          sliding_window=WINDOW)
    cfg, params = hf.load_hf_params(hf_dir)
    self.assertEqual(cfg.sliding_windows, (WINDOW,) * cfg.num_layers)
    tokens, mask = padded_batch(cfg.vocab_size)
    windowed, _ = _forward(params, tokens, mask, cfg)
    full, _ = _forward(params, tokens, mask,
                       cfg.replace(sliding_windows=(0,) * cfg.num_layers))
    windowed, full = np.asarray(windowed), np.asarray(full)
    # Identical inside the window, different beyond it.
    np.testing.assert_allclose(windowed[0, :WINDOW], full[0, :WINDOW],
                               atol=1e-6)
    self.assertGreater(np.abs(windowed[0, WINDOW:] - full[0, WINDOW:]).max(),
                       1e-3)


class InvariantsTest(absltest.TestCase):
  """Invariants on the llama GQA config (its forward is compiled above)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp(prefix='model_test_inv_')
    cls.models, cls.params = [], []
    for seed in range(3):
      hf_dir = f'{cls.root}/llama_{seed}'
      cls.models.append(testutil.make_tiny_hf(hf_dir, 'llama', seed=seed,
                                              tokenizer=False))
      cfg, params = hf.load_hf_params(hf_dir)
      cls.params.append(params)
    cls.cfg = cfg
    cls.tokens, cls.mask = padded_batch(cfg.vocab_size)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  def test_capture_does_not_change_logits(self):
    plain, stats = _forward(self.params[0], self.tokens, self.mask, self.cfg)
    self.assertEqual(stats, {})
    spec = capture_lib.CaptureSpec(sites=capture_lib.ALL_SITES)
    captured, stats = _forward(self.params[0], self.tokens, self.mask,
                               self.cfg, capture=spec)
    np.testing.assert_allclose(captured, plain, atol=1e-6, rtol=0)
    self.assertEqual(float(stats['count']), float(self.mask.sum()))
    self.assertEqual(stats['mlp.down_proj']['sum_abs'].shape,
                     (self.cfg.num_layers, self.cfg.hidden_size))

  def test_vmapped_models_equal_loop(self):
    stacked = forward.stack_params(self.params)
    together = np.asarray(_forward_models(stacked, self.tokens, self.mask,
                                          self.cfg))
    self.assertEqual(together.shape[0], 3)
    for k, params in enumerate(self.params):
      alone, _ = _forward(params, self.tokens, self.mask, self.cfg)
      np.testing.assert_allclose(together[k], alone, atol=1e-5, rtol=0)
    # The three models really differ, so the comparison is not vacuous.
    self.assertGreater(np.abs(together[0] - together[1]).max(), 1e-2)
    # The layer-major layout (what collect uses) gives the same logits, and
    # unstacks to the same models.
    major = forward.stack_params(self.params, layer_major=True)
    self.assertEqual(major['layers']['mlp']['up_proj']['kernel'].shape[:2],
                     (self.cfg.num_layers, 3))
    np.testing.assert_array_equal(
        np.asarray(_forward_models(major, self.tokens, self.mask, self.cfg,
                                   layer_major=True)), together)
    for a, b in zip(jax.tree.leaves(forward.to_layer_major(stacked)),
                    jax.tree.leaves(major)):
      np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(forward.unstack_params(major, 2, True)),
                    jax.tree.leaves(self.params[2])):
      np.testing.assert_array_equal(a, b)

  def test_unrolled_layers_equal_scanned(self):
    # decoder.Decoder(scan_layers=False), used by greedy decoding: the same
    # logits and statistics from the unstacked params.
    spec = capture_lib.CaptureSpec(sites=capture_lib.OUTPUT_SITES)
    scanned, st_s = _forward(self.params[0], self.tokens, self.mask,
                             self.cfg, capture=spec)
    unrolled_params = forward.unstack_layers(self.params[0])
    self.assertNotIn('layers', unrolled_params)
    self.assertIn(f'layers_{self.cfg.num_layers - 1}', unrolled_params)
    unrolled, st_u = _forward(unrolled_params, self.tokens, self.mask,
                              self.cfg, capture=spec)
    np.testing.assert_allclose(unrolled, scanned, atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(st_u), jax.tree.leaves(st_s)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

  def test_remat_keeps_loss_and_gradients(self):
    # Decoder(remat=...) only changes what the backward keeps: the loss and
    # every gradient equal the plain program's (scanned and unrolled).
    batch = {'tokens_bt': self.tokens, 'attention_mask_bt': self.mask,
             'loss_mask_bt': self.mask}

    def grads(params, remat):
      return jax.value_and_grad(lambda p: losses.nll_sum(
          p, batch, self.cfg, remat=remat)[0])(params)

    for params in (self.params[0], forward.unstack_layers(self.params[0])):
      want_loss, want = grads(params, 'none')
      for remat in ('dots', 'full'):
        loss, got = grads(params, remat)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
          # Recomputation reorders float32 sums: equal to rounding (the
          # loss is a sum over tokens, so gradients are O(10)).
          np.testing.assert_allclose(a, b, rtol=0,
                                     atol=1e-5 * np.abs(b).max())
    with self.assertRaises(KeyError):
      grads(self.params[0], 'some')

  def test_pairwise_capture_needs_the_models_vmap(self):
    spec = capture_lib.CaptureSpec(sites=('mlp.up_proj',), pairwise=True)
    with self.assertRaisesRegex(NameError, 'models'):
      _forward(self.params[0], self.tokens, self.mask, self.cfg,
               capture=spec)

  def test_later_tokens_do_not_change_earlier_logits(self):
    t0 = 10
    changed = self.tokens.copy()
    changed[:, t0:] = (changed[:, t0:] + 7 - 4) % (self.cfg.vocab_size - 4) + 4
    full = np.ones_like(self.mask)
    before, _ = _forward(self.params[0], self.tokens, full, self.cfg)
    after, _ = _forward(self.params[0], changed, full, self.cfg)
    before, after = np.asarray(before), np.asarray(after)
    np.testing.assert_allclose(after[:, :t0], before[:, :t0], atol=1e-6,
                               rtol=0)
    self.assertGreater(np.abs(after[:, t0:] - before[:, t0:]).max(), 1e-2)

  def test_causality_through_gradients(self):
    # d logits[t] / d (embedding of token at t') must vanish for t' > t. We
    # differentiate w.r.t. a per-position scale on the embedding table rows
    # by giving each position a distinct token id.
    cfg = self.cfg
    t = 6
    tokens = np.arange(4, 4 + LENGTH)[None, :] % cfg.vocab_size
    full = np.ones_like(tokens)

    def logit_t(embedding):
      params = dict(self.params[0], embed_tokens={'embedding': embedding})
      logits, _ = _forward(params, tokens, full, cfg)
      return jnp.sum(logits[0, t])

    grad = np.asarray(jax.grad(logit_t)(
        self.params[0]['embed_tokens']['embedding']))
    row_norm = np.abs(grad[tokens[0]]).sum(-1)  # [T], one row per position
    np.testing.assert_array_equal(row_norm[t + 1:], 0.0)
    self.assertTrue(np.all(row_norm[:t + 1] > 0))

  def test_packed_documents_equal_separate_forwards(self):
    # Two documents packed in one row with segment ids and reset positions
    # give exactly the logits of two separate forwards.
    doc_a, doc_b = self.tokens[0, :7], self.tokens[0, 3:12]
    packed = np.concatenate([doc_a, doc_b])[None]
    seg = np.array([[1] * 7 + [2] * 9])
    pos = np.array([list(range(7)) + list(range(9))])
    out = forward.apply(self.params[0], jnp.asarray(packed), self.cfg,
                        positions_bt=jnp.asarray(pos),
                        segment_ids_bt=jnp.asarray(seg)).logits
    sep_a = forward.apply(self.params[0], jnp.asarray(doc_a[None]),
                          self.cfg).logits
    sep_b = forward.apply(self.params[0], jnp.asarray(doc_b[None]),
                          self.cfg).logits
    np.testing.assert_allclose(out[:, :7], sep_a, atol=1e-5)
    np.testing.assert_allclose(out[:, 7:], sep_b, atol=1e-5)

  def test_bf16_params_close_to_fp32(self):
    hf_dir = f'{self.root}/llama_0'
    cfg16, params16 = hf.load_hf_params(
        hf_dir, self.cfg.replace(dtype='bfloat16'), param_dtype='bfloat16')
    self.assertEqual(params16['norm']['scale'].dtype, jnp.bfloat16)
    ours16, _ = _forward(params16, self.tokens, self.mask, cfg16)
    ours32, _ = _forward(self.params[0], self.tokens, self.mask, self.cfg)
    ours16, ours32 = np.asarray(ours16, np.float32), np.asarray(ours32)
    self.assertTrue(np.all(np.isfinite(ours16)))
    diff = max_diff_on_tokens(ours16, ours32, self.mask)
    scale = np.abs(ours32).max()
    print(f'bf16 vs fp32: max |logit diff| = {diff:.3f} (max |logit| '
          f'{scale:.2f})')
    self.assertLess(diff, 0.05 * scale)
    agree = (ours16.argmax(-1) == ours32.argmax(-1))[self.mask == 1].mean()
    self.assertGreater(agree, 0.9)


if __name__ == '__main__':
  absltest.main()
