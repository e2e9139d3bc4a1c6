"""Tests for optim.py: channel/module freezing, lean state, schedules."""

import re

from absl.testing import absltest
import jax
import numpy as np
import optax

from act_jax.model import forward
from act_jax.train import optim
from act_jax.model import sharding
from act_jax.train import finetune
from act_jax.model.config import ModelConfig

CFG = ModelConfig(model_type='llama', vocab_size=48, hidden_size=32,
                  intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8)


def toy_batches(n, batch=8, length=12, vocab=48, seed=0):
  """Sequences counting up mod vocab from a random start: learnable."""
  rng = np.random.RandomState(seed)
  out = []
  for _ in range(n):
    start = rng.randint(0, vocab, (batch, 1))
    tokens = (start + np.arange(length)) % vocab
    ones = np.ones((batch, length), np.int32)
    out.append({'tokens_bt': tokens.astype(np.int32),
                'attention_mask_bt': ones, 'loss_mask_bt': ones})
  return out


def channel_mask(seed=0):
  """Per-layer different channel sets on two sites (as [L, C] masks)."""
  rng = np.random.RandomState(seed)
  q = rng.rand(CFG.num_layers, CFG.q_dim) < 0.2
  down = np.zeros((CFG.num_layers, CFG.hidden_size), bool)
  down[0, [1, 5, 7]] = True  # layer 1 holds none
  return {'layers': {'self_attn': {'q_proj': {'kernel': q}},
                     'mlp': {'down_proj': {'kernel': down}}}}


def tcfg(**kw):
  base = dict(num_steps=20, lr=1e-2, weight_decay=0.1, warmup_frac=0.1,
              batch_size=8, max_seq_len=12, scope='channels', save_every=0,
              log_every=100)
  base.update(kw)
  return finetune.TrainConfig(**base)


class OptimTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.params = jax.device_get(forward.init_params(CFG, jax.random.key(0)))
    cls.batches = toy_batches(4)

  def _run(self, **kw):
    p = jax.tree.map(np.copy, self.params)
    # One device: these tests are about update math, not sharding (which
    # train_test covers), and a 1-device step compiles much faster.
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    out = finetune.finetune(tcfg(**kw), p, CFG, self.batches, mesh=mesh,
                            mask=channel_mask() if kw.get('scope') != 'full'
                            else None)
    return jax.device_get(out)

  def _steps(self, lean, slice_grads, steps=20):
    """`steps` jitted train steps of one optimizer path (no checkpoints)."""
    opt = optim.make_optimizer(tcfg(lean=lean), self.params, channel_mask(),
                               slice_grads=slice_grads)
    step = jax.jit(finetune.make_train_step(CFG, opt, 1, 'float32'))
    p = jax.tree.map(np.copy, self.params)
    state = opt.tx.init(p)
    for i in range(steps):
      p, state, _ = step(p, state, self.batches[i % len(self.batches)], i,
                         opt.masks)
    return opt, jax.device_get(p)

  def test_channels_freeze_bitwise_and_four_paths_match(self):
    # Full state or lean Adam state, dense weight gradients (then masked) or
    # slice gradients (only the selected columns'): the same training.
    runs = {(lean, sg): self._steps(lean, sg)
            for lean in (False, True) for sg in (False, True)}
    self.assertEqual(runs[False, False][0].slices, {})
    self.assertEqual(sorted(runs[True, True][0].slices),
                     ['layers.mlp.down_proj.kernel',
                      'layers.self_attn.q_proj.kernel'])
    mask = optim.normalize_mask(channel_mask(), self.params)
    sel, _ = optim.mask_counts(mask, self.params)
    ref = runs[False, False][1]
    for key, (_, out) in runs.items():
      moved = 0
      for (path, before), after, m in zip(
          jax.tree_util.tree_leaves_with_path(self.params),
          jax.tree.leaves(out), jax.tree.leaves(mask)):
        m = np.broadcast_to(m, before.shape)
        frozen_same = before.view(np.uint32)[~m] == after.view(np.uint32)[~m]
        self.assertTrue(frozen_same.all(), (key, jax.tree_util.keystr(path)))
        moved += int((before[m] != after[m]).sum())
      self.assertEqual(moved, sel, key)  # every selected entry moved
      # Not bitwise: the same float32 products are summed in another order
      # (a k-wide weight-gradient GEMM instead of the full one, gathers
      # before instead of after the Adam math), and 20 Adam steps at lr 1e-2
      # carry those last-bit differences along; they stay at float32
      # rounding level of the entries' size.
      for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=key)
    # And through finetune() (its default: full state, slice gradients).
    got = self._run(scope='channels')
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

  def test_slice_gradients_skip_frozen_weight_gradients(self):
    # The compiled step of the slice path computes no full-size weight
    # gradient for the selected kernels (only k-wide ones); the dense path
    # does. Dot output shapes in the optimized HLO tell them apart (B*T = 96
    # tokens is no kernel dimension here).
    def kernel_shaped_dots(slice_grads):
      opt = optim.make_optimizer(tcfg(lean=True), self.params,
                                 channel_mask(), slice_grads=slice_grads)
      fn = jax.jit(finetune.make_train_step(CFG, opt, 1, 'float32'))
      txt = fn.lower(self.params, opt.tx.init(self.params), self.batches[0],
                     0, opt.masks).compile().as_text()
      shapes = set(re.findall(r'f32\[(\d+,\d+)\]\{[0-9,]+\} dot\(', txt))
      q = (CFG.hidden_size, CFG.q_dim)  # q_proj kernel [D, H*E]
      down = (CFG.intermediate_size, CFG.hidden_size)
      return {s for s in shapes
              if tuple(map(int, s.split(','))) in (q, q[::-1], down,
                                                    down[::-1])}
    self.assertNotEqual(kernel_shaped_dots(False), set())
    self.assertEqual(kernel_shaped_dots(True), set())

  def test_lean_state_is_smaller(self):
    tc = tcfg()
    full = optim.make_optimizer(tc, self.params, channel_mask())
    lean = optim.make_optimizer(tcfg(lean=True), self.params, channel_mask())
    b_full = optim.opt_state_bytes(full.tx, self.params)
    b_lean = optim.opt_state_bytes(lean.tx, self.params)
    # Full-state keeps mu, nu for the two leaves holding channels (others
    # none); lean keeps them only for the gathered columns.
    lay = self.params['layers']
    touched = (lay['self_attn']['q_proj']['kernel'].size +
               lay['mlp']['down_proj']['kernel'].size)
    self.assertBetween(b_full, 8 * touched, 8 * touched + 64)
    self.assertLess(b_lean, b_full / 4)
    sel, _ = optim.mask_counts(optim.normalize_mask(channel_mask(),
                                                    self.params), self.params)
    self.assertGreaterEqual(b_lean, 2 * 4 * sel)  # mu and nu of each entry

  def test_modules_freeze_other_leaves_bitwise(self):
    out = self._run(scope='modules')
    p, o = self.params['layers'], out['layers']
    # q_proj moves in both layers (channels there in both), whole rows too.
    self.assertTrue((p['self_attn']['q_proj']['kernel'] !=
                     o['self_attn']['q_proj']['kernel']).mean() > 0.9)
    # down_proj: layer 0 moves entirely, layer 1 holds no channel: frozen.
    self.assertTrue((p['mlp']['down_proj']['kernel'][0] !=
                     o['mlp']['down_proj']['kernel'][0]).mean() > 0.9)
    np.testing.assert_array_equal(p['mlp']['down_proj']['kernel'][1],
                                  o['mlp']['down_proj']['kernel'][1])
    for name in ('k_proj', 'v_proj', 'o_proj'):
      np.testing.assert_array_equal(p['self_attn'][name]['kernel'],
                                    o['self_attn'][name]['kernel'])
    np.testing.assert_array_equal(self.params['embed_tokens']['embedding'],
                                  out['embed_tokens']['embedding'])
    # frozen leaves keep no optimizer state
    opt = optim.make_optimizer(tcfg(scope='modules'), self.params,
                               channel_mask())
    self.assertLess(optim.opt_state_bytes(opt.tx, self.params),
                    optim.opt_state_bytes(
                        optim.make_optimizer(tcfg(scope='full'), self.params
                                            ).tx, self.params) / 3)

  def test_lean_gather_scatter_roundtrip(self):
    rng = np.random.RandomState(1)
    x = rng.randn(2, 6, 5).astype(np.float32)
    cols = np.zeros((2, 1, 5), bool)
    cols[0, 0, [1, 3]] = True
    cols[1, 0, [4]] = True  # layers select different counts: padding
    rows = np.zeros((2, 6, 1), bool)
    rows[1, [0, 2, 5], 0] = True
    both = cols | rows  # coupled rows + columns: flat indices
    for m, kind in ((cols, 'axis'), (rows, 'axis'), (both, 'flat')):
      plan = optim._plan_leaf(m, x.shape, stacked=True)
      self.assertEqual(plan.kind, kind)
      back = optim._scatter(optim._gather(x, plan), plan, x)
      np.testing.assert_array_equal(np.asarray(back),
                                    np.where(np.broadcast_to(m, x.shape), x,
                                             0))
    # a compact site mask (masks.py) normalizes like its leaf tree
    site = {'self_attn.q_proj': channel_mask()['layers']['self_attn'][
        'q_proj']['kernel']}
    a = optim.normalize_mask(site, self.params)
    b = optim.normalize_mask({'layers': {'self_attn': {'q_proj': {
        'kernel': site['self_attn.q_proj']}}}}, self.params)
    for u, v, p in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                       jax.tree.leaves(self.params)):
      np.testing.assert_array_equal(np.broadcast_to(u, p.shape),
                                    np.broadcast_to(v, p.shape))

  def test_optax_masked_would_not_freeze(self):
    # Why the mask goes on the final updates: optax.masked passes frozen
    # leaves' raw gradients through as updates.
    tx = optax.masked(optax.adam(1.0), {'a': True, 'b': False})
    g = {'a': np.ones(2, np.float32), 'b': np.ones(2, np.float32)}
    u, _ = tx.update(g, tx.init(g))
    self.assertTrue(np.all(np.asarray(u['b']) != 0))

  def test_schedule(self):
    s = optim.make_schedule(tcfg(num_steps=100, lr=1.0, warmup_frac=0.1,
                                 schedule='linear'))
    self.assertAlmostEqual(float(s(0)), 0.0)
    self.assertAlmostEqual(float(s(5)), 0.5, places=5)
    self.assertAlmostEqual(float(s(10)), 1.0, places=5)
    self.assertAlmostEqual(float(s(55)), 0.5, places=5)
    c = optim.make_schedule(tcfg(num_steps=100, lr=1.0, warmup_frac=0.1))
    self.assertAlmostEqual(float(c(55)), 0.5, places=5)
    self.assertAlmostEqual(float(c(100)), 0.0, places=5)
    # A floor: the decay ends at final_lr_frac * lr, as optax's warmup-cosine.
    f = optim.make_schedule(tcfg(num_steps=100, lr=2.0, warmup_frac=0.05,
                                 final_lr_frac=0.1))
    ref = optax.warmup_cosine_decay_schedule(0.0, 2.0, 5, 100, 0.2)
    for step in (0, 3, 5, 40, 99, 100):
      self.assertAlmostEqual(float(f(step)), float(ref(step)), places=5)
    lin = optim.make_schedule(tcfg(num_steps=10, lr=1.0, warmup_frac=0.0,
                                   schedule='linear', final_lr_frac=0.5))
    self.assertAlmostEqual(float(lin(10)), 0.5, places=5)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, 'scope'):
      optim.make_optimizer(tcfg(scope='rows'), self.params, channel_mask())
    with self.assertRaisesRegex(ValueError, 'selects no entries'):
      optim.make_optimizer(tcfg(), self.params, {'norm': {'scale': False}})
    with self.assertRaisesRegex(ValueError, 'needs a channel mask'):
      optim.make_optimizer(tcfg(), self.params, None)
    with self.assertRaisesRegex(ValueError, 'lean'):
      optim.make_optimizer(tcfg(scope='modules', lean=True), self.params,
                           channel_mask())
    with self.assertRaisesRegex(ValueError, 'not params'):
      optim.normalize_mask({'nope': True}, self.params)
    with self.assertRaisesRegex(ValueError, 'does not broadcast'):
      optim.normalize_mask({'norm': {'scale': np.ones(3, bool)}}, self.params)


if __name__ == '__main__':
  absltest.main()
