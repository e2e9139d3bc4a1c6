"""Tests for act_jax.transfer: transplant invariants and merge policies."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from act_jax.model import forward
from act_jax.act import masks as masks_lib
from act_jax.act import transfer
from act_jax.model.config import ModelConfig

CFG = ModelConfig(model_type='qwen2', vocab_size=50, hidden_size=32,
                  intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, qkv_bias=True)


def _params(seed):
  """Random params (numpy draws; every leaf non-trivial, biases too)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda a: jnp.asarray(rng.normal(size=a.shape).astype(a.dtype)),
      forward.abstract_params(CFG))


def _leaf(p, dotted):
  for k in dotted.split('.'):
    p = p[k]
  return np.asarray(p)


def _bitwise_equal(a, b):
  return np.array_equal(np.asarray(a).view(np.uint32),
                        np.asarray(b).view(np.uint32))


class TransplantTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tgt, cls.src = _params(0), _params(1)
    cls.shapes = masks_lib.site_shapes(CFG)

  def test_empty_mask_returns_target_bitwise(self):
    out = transfer.transplant_channels(self.tgt, self.src,
                                       masks_lib.empty_mask(self.shapes))
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(self.tgt)):
      self.assertTrue(_bitwise_equal(a, b))

  def test_full_mask_gives_source_bitwise_except_untouched(self):
    full = {s: m for s, m in masks_lib.full_mask(self.shapes).items()
            if s in masks_lib.capture.OUTPUT_SITES}
    out = transfer.transplant_channels(self.tgt, self.src, full)
    for path, x in jax.tree_util.tree_leaves_with_path(out):
      dotted = '.'.join(k.key for k in path)
      want = (self.src if dotted.startswith('layers.self_attn.')
              and 'norm' not in dotted or dotted.startswith('layers.mlp.')
              else self.tgt)
      self.assertTrue(_bitwise_equal(x, _leaf(want, dotted)), dotted)

  def test_include_copies_norms_and_embeddings(self):
    full = masks_lib.full_mask(self.shapes)
    out = transfer.transplant_channels(
        self.tgt, self.src, full,
        include=('embed_tokens.*', '.*norm.*', 'lm_head.*'))
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(self.src)):
      self.assertTrue(_bitwise_equal(a, b))

  def test_partial_mask_changes_exactly_masked_columns_and_bias(self):
    m = masks_lib.empty_mask(self.shapes)
    m['self_attn.q_proj'][1, [3, 9]] = True
    m['mlp.down_proj.in'][0, [5]] = True  # an input row of down_proj
    out = transfer.transplant_channels(self.tgt, self.src, m)
    q = 'layers.self_attn.q_proj.'
    kq_o, kq_t, kq_s = (_leaf(t, q + 'kernel')
                        for t in (out, self.tgt, self.src))
    expect = kq_t.copy()
    expect[1, :, [3, 9]] = kq_s[1, :, [3, 9]]
    np.testing.assert_array_equal(kq_o, expect)
    self.assertFalse(np.array_equal(kq_o, kq_t))
    b_o, b_t, b_s = (_leaf(t, q + 'bias') for t in (out, self.tgt, self.src))
    expect = b_t.copy()
    expect[1, [3, 9]] = b_s[1, [3, 9]]
    np.testing.assert_array_equal(b_o, expect)
    d = 'layers.mlp.down_proj.kernel'
    d_o, d_t, d_s = (_leaf(t, d) for t in (out, self.tgt, self.src))
    expect = d_t.copy()
    expect[0, 5, :] = d_s[0, 5, :]
    np.testing.assert_array_equal(d_o, expect)
    # Everything else is the target's own array.
    for path, x in jax.tree_util.tree_leaves_with_path(out):
      dotted = '.'.join(k.key for k in path)
      if dotted not in (q + 'kernel', q + 'bias', d):
        node = self.tgt
        for key in dotted.split('.'):
          node = node[key]
        self.assertIs(x, node, dotted)

  def test_alpha_interpolates(self):
    m = masks_lib.empty_mask(self.shapes)
    m['mlp.up_proj'][0, 7] = True
    out = transfer.transplant_channels(self.tgt, self.src, m, alpha=0.25)
    k = 'layers.mlp.up_proj.kernel'
    t, s, o = _leaf(self.tgt, k), _leaf(self.src, k), _leaf(out, k)
    np.testing.assert_allclose(o[0, :, 7], t[0, :, 7] + 0.25 *
                               (s[0, :, 7] - t[0, :, 7]), rtol=1e-6)
    np.testing.assert_array_equal(o[:, :, :7], t[:, :, :7])

  def test_sharded_inputs_stay_sharded(self):
    mesh = jax.make_mesh((8,), ('x',),
                         axis_types=(jax.sharding.AxisType.Auto,))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
        None, None, 'x'))
    k = 'layers.mlp.gate_proj.kernel'
    tgt = jax.tree.map(lambda x: x, self.tgt)
    src = jax.tree.map(lambda x: x, self.src)
    tgt['layers']['mlp']['gate_proj']['kernel'] = jax.device_put(
        _leaf(self.tgt, k), spec)
    src['layers']['mlp']['gate_proj']['kernel'] = jax.device_put(
        _leaf(self.src, k), spec)
    m = masks_lib.empty_mask(self.shapes)
    m['mlp.gate_proj'][1, :3] = True
    out = transfer.transplant_channels(tgt, src, m)
    leaf = out['layers']['mlp']['gate_proj']['kernel']
    self.assertEqual(leaf.sharding.spec, spec.spec)
    expect = _leaf(self.tgt, k).copy()
    expect[1, :, :3] = _leaf(self.src, k)[1, :, :3]
    np.testing.assert_array_equal(np.asarray(leaf), expect)

  def test_shape_mismatch_names_leaf(self):
    other = jax.tree.map(lambda x: x, self.src)
    other['layers']['mlp']['up_proj']['kernel'] = jnp.zeros((2, 32, 40))
    with self.assertRaisesRegex(transfer.TransferError, 'up_proj.*kernel'):
      transfer.transplant_channels(self.tgt, other,
                                   masks_lib.empty_mask(self.shapes))

  def test_unknown_site_lists_known(self):
    with self.assertRaisesRegex(masks_lib.MaskError, 'known sites:.*q_proj'):
      transfer.transplant_channels(self.tgt, self.src,
                                   {'mlp.fc1': np.ones((2, 48), bool)})


class MergeTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.base, cls.s1, cls.s2 = _params(0), _params(1), _params(2)
    cls.shapes = masks_lib.site_shapes(CFG)

  def _masks(self):
    a = masks_lib.empty_mask(self.shapes)
    b = masks_lib.empty_mask(self.shapes)
    a['mlp.up_proj'][0, [1, 2, 3]] = True
    b['mlp.up_proj'][0, [3, 4]] = True
    b['self_attn.k_proj'][1, 0] = True
    return a, b

  def test_policies_and_conflict_report(self):
    a, b = self._masks()
    k = 'layers.mlp.up_proj.kernel'
    base, s1, s2 = (_leaf(t, k) for t in (self.base, self.s1, self.s2))
    sc1 = {s: np.zeros(sh, np.float32) for s, sh in self.shapes.items()}
    sc2 = {s: np.ones(sh, np.float32) for s, sh in self.shapes.items()}
    want_c3 = {'average': (s1[0, :, 3] + s2[0, :, 3]) / 2,
               'priority': s1[0, :, 3], 'max_score': s2[0, :, 3]}
    for policy, want in want_c3.items():
      out, rep = transfer.merge(self.base, [self.s1, self.s2], [a, b],
                                scores=[sc1, sc2], policy=policy,
                                names=['A', 'B'])
      o = _leaf(out, k)
      np.testing.assert_array_equal(o[0, :, [1, 2]], s1[0, :, [1, 2]])
      np.testing.assert_array_equal(o[0, :, 4], s2[0, :, 4])
      np.testing.assert_allclose(o[0, :, 3], want, rtol=1e-6, atol=1e-7)
      np.testing.assert_array_equal(o[0, :, 5:], base[0, :, 5:])
      np.testing.assert_array_equal(o[1], base[1])
      self.assertEqual(rep['num_conflicts'], 1)
      c = rep['conflicts'][0]
      self.assertEqual((c['site'], c['layer'], c['channel'], c['sources']),
                       ('mlp.up_proj', 0, 3, ['A', 'B']))
      kk = 'layers.self_attn.k_proj.'
      np.testing.assert_array_equal(_leaf(out, kk + 'bias')[1, 0],
                                    _leaf(self.s2, kk + 'bias')[1, 0])
      np.testing.assert_array_equal(_leaf(out, 'norm.scale'),
                                    _leaf(self.base, 'norm.scale'))

  def test_priority_order_and_bad_policy(self):
    a, b = self._masks()
    out, rep = transfer.merge(self.base, [self.s1, self.s2], [a, b],
                              policy='priority', priority=[1, 0])
    k = 'layers.mlp.up_proj.kernel'
    np.testing.assert_array_equal(_leaf(out, k)[0, :, 3],
                                  _leaf(self.s2, k)[0, :, 3])
    self.assertEqual(rep['conflicts'][0]['resolved'], 'source1')
    with self.assertRaisesRegex(transfer.TransferError, '--policy'):
      transfer.merge(self.base, [self.s1], [a], policy='vote')
    with self.assertRaisesRegex(transfer.TransferError, 'max_score needs'):
      transfer.merge(self.base, [self.s1], [a], policy='max_score')


if __name__ == '__main__':
  absltest.main()
