"""Tests for act_jax.scores and act_jax.selection (pure numpy inputs)."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

from act_jax.model import forward
from act_jax.act import localize
from act_jax.act import localize
from act_jax.model.config import ModelConfig


def _stats(seed=0, m=3, l=2, c=8):
  rng = np.random.default_rng(seed)
  pair = rng.random((m, m, l, c)).astype(np.float32) * 10
  pair = pair + pair.transpose(1, 0, 2, 3)
  site = {'sum': rng.normal(size=(m, l, c)).astype(np.float32),
          'sum_abs': rng.random((m, l, c)).astype(np.float32) * 5,
          'sum_sq': rng.random((m, l, c)).astype(np.float32),
          'pair_abs_diff': pair}
  return {'mlp.up_proj': site, 'self_attn.q_proj': dict(site)}, \
      np.array([4, 4, 4])


class ScoresTest(parameterized.TestCase):

  def test_activation_scores(self):
    st, count = _stats()
    s = localize.channel_scores(st, count, 1, 2)
    np.testing.assert_allclose(
        s['mlp.up_proj'], st['mlp.up_proj']['pair_abs_diff'][1, 2] / 4,
        rtol=1e-6)
    self.assertEqual(s['mlp.up_proj'].dtype, np.float32)
    d = localize.channel_scores(st, count, 1, 2, 'diff_of_mean_abs')
    np.testing.assert_allclose(
        d['mlp.up_proj'], np.abs(st['mlp.up_proj']['sum_abs'][1] / 4 -
                                 st['mlp.up_proj']['sum_abs'][2] / 4),
        rtol=1e-5)
    for name in ('mean_abs_diff_norm', 'diff_of_mean_abs_norm'):
      n = localize.channel_scores(st, count, 1, 2, name)
      self.assertAlmostEqual(float(n['mlp.up_proj'].mean()), 1.0, places=5)

  def test_weight_diff_matches_numpy(self):
    cfg = ModelConfig(model_type='qwen2', vocab_size=20, hidden_size=16,
                      intermediate_size=24, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=8, qkv_bias=True)
    rng = np.random.default_rng(0)
    a, b = (jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype),
                         forward.abstract_params(cfg)) for _ in range(2))
    w = localize.weight_scores(a, b, ['self_attn.k_proj', 'mlp.down_proj.in'])
    k = lambda p: p['layers']['self_attn']['k_proj']
    want = np.sqrt(((k(a)['kernel'] - k(b)['kernel'])**2).sum(1) +
                   (k(a)['bias'] - k(b)['bias'])**2)
    np.testing.assert_allclose(w['self_attn.k_proj'], want, rtol=1e-5)
    d = lambda p: p['layers']['mlp']['down_proj']['kernel']
    np.testing.assert_allclose(w['mlp.down_proj.in'],
                               np.linalg.norm(d(a) - d(b), axis=2),
                               rtol=1e-5)
    with self.assertRaisesRegex(localize.ScoreError, 'undefined for site'):
      localize.weight_scores(a, b, ['input_layernorm'])

  def test_random_is_seeded(self):
    st, count = _stats()
    r0 = localize.channel_scores(st, count, 0, 1, 'random', seed=0)
    r0b = localize.channel_scores(st, count, 2, 1, 'random', seed=0)
    r1 = localize.channel_scores(st, count, 0, 1, 'random', seed=1)
    np.testing.assert_array_equal(r0['mlp.up_proj'], r0b['mlp.up_proj'])
    self.assertFalse(np.array_equal(r0['mlp.up_proj'], r1['mlp.up_proj']))
    self.assertFalse(np.array_equal(r0['mlp.up_proj'],
                                    r0['self_attn.q_proj']))

  def test_errors(self):
    st, count = _stats()
    with self.assertRaisesRegex(localize.ScoreError, 'known sites: mlp.up_proj'):
      localize.channel_scores(st, count, 0, 1, sites=['mlp.nope'])
    with self.assertRaisesRegex(localize.ScoreError, 'unknown score'):
      localize.channel_scores(st, count, 0, 1, 'cosine')
    with self.assertRaisesRegex(localize.ScoreError, 'same model'):
      localize.channel_scores(st, count, 1, 1)
    with self.assertRaisesRegex(localize.ScoreError, 'out of range'):
      localize.channel_scores(st, count, 0, 5)
    with self.assertRaisesRegex(localize.ScoreError, 'needs the source'):
      localize.channel_scores(st, count, 0, 1, 'weight_diff')


class SelectionTest(parameterized.TestCase):

  @parameterized.parameters((0.05, 64, 4), (0.1, 30, 3), (1.0, 7, 7),
                            (0.01, 10, 1), (0.5, 9, 5), (0.2, 1536, 308))
  def test_top_count(self, rho, n, k):
    self.assertEqual(localize.top_count(rho, n), k)

  def test_per_site_ties_and_overrides(self):
    s = {'mlp.up_proj': np.array([[1., 5., 5., 0., 5.], [0, 0, 0, 0, 0]]),
         'self_attn.q_proj': np.array([[3., 2., 1., 0., 9.]])}
    m = localize.select_channels(s, top_frac=0.4)
    self.assertEqual(np.flatnonzero(m['mlp.up_proj'][0]).tolist(), [1, 2])
    self.assertEqual(np.flatnonzero(m['mlp.up_proj'][1]).tolist(), [0, 1])
    m = localize.select_channels(s, top_frac=0.2,
                                 overrides={r'mlp\..*': 0.6})
    self.assertEqual(m['mlp.up_proj'].sum(-1).tolist(), [3, 3])
    self.assertEqual(np.flatnonzero(m['self_attn.q_proj'][0]).tolist(), [4])

  def test_global_threshold_mass(self):
    s = {'a': np.array([[4., 3., 2., 1.]]), 'b': np.array([[4., 0., 0., 0.]])}
    g = localize.select_channels(s, 'global', top_frac=0.25)
    self.assertEqual((g['a'][0].tolist(), g['b'][0].tolist()),
                     ([True, False, False, False],
                      [True, False, False, False]))
    t = localize.select_channels(s, 'threshold', threshold=3.0)
    self.assertEqual(t['a'][0].tolist(), [True, True, False, False])
    m = localize.select_channels(s, 'mass', mass=0.7)
    self.assertEqual(m['a'][0].tolist(), [True, True, False, False])
    self.assertEqual(m['b'][0].tolist(), [True, False, False, False])
    m = localize.select_channels(s, 'mass', mass=1.0)
    self.assertEqual(m['a'][0].tolist(), [True] * 4)
    z = localize.select_channels({'a': np.zeros((1, 4))}, 'mass', mass=0.5)
    self.assertFalse(z['a'].any())

  @parameterized.parameters(0.0, -0.1, 1.5, float('nan'))
  def test_bad_rho_names_flag(self, rho):
    with self.assertRaisesRegex(localize.SelectError, r'--top_frac.*\(0, 1\]'):
      localize.select_channels({'a': np.ones((1, 4))}, top_frac=rho)

  def test_other_errors(self):
    s = {'a': np.ones((1, 4))}
    with self.assertRaisesRegex(localize.SelectError, '--select'):
      localize.select_channels(s, 'best')
    with self.assertRaisesRegex(localize.SelectError, 'needs --mass'):
      localize.select_channels(s, 'mass')
    with self.assertRaisesRegex(localize.SelectError, 'NaN'):
      localize.select_channels({'a': np.array([[np.nan, 1.]])})
    with self.assertRaisesRegex(localize.SelectError, 'global'):
      localize.select_channels(s, 'global', overrides={'a': 0.5})


if __name__ == '__main__':
  absltest.main()
