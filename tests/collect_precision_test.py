"""Statistics stay float32 whatever the compute dtype and matmul precision.

The in-graph reductions ask for `Precision.HIGHEST` themselves, so they do
not depend on the global flag conftest.py sets (TPU would otherwise reduce
in bf16 passes, recent GPUs in TF32). On the real SmolLM2-135M cut to its
first 8 layers (built once into a cache outside the repo,
tests/smollm2_test.py) statistics collected
with bf16 params and compute pick the same top-5% channels per (layer,
site) as float32 ones: Jaccard >= 0.9 per site, for each model's mean
|activation| and for the pairwise score of two related models.
"""

from absl.testing import absltest
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from act_jax import data
from act_jax.act import analysis
from act_jax.act import collect
from act_jax.act import localize
from act_jax.cases.smollm2 import weights
from act_jax.io import hf
from act_jax.io import models as models_io
from act_jax.model import capture
from act_jax.model import sharding
from act_jax.io import stats as stats_io

TEXTS = (
    'The history of the city begins with a small fishing village on the '
    'northern bank of the river, where merchants built warehouses.',
    'Photosynthesis is the process by which green plants use sunlight to '
    'turn water and carbon dioxide into sugar and oxygen.',
    'Dear Sam, thank you for your letter and for the photographs of the '
    'new house. We are all well here, although the winter was long.',
    'def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints 5',
    'Question: What is 17 plus 25?\nAnswer: 17 plus 25 is 42.',
    'In 1905 Albert Einstein published four papers that changed physics: '
    'on the photoelectric effect, Brownian motion and relativity.',
    'Ingredients: two eggs, a cup of flour, half a cup of milk and a pinch '
    'of salt. Whisk everything together and let it rest.',
    'The quick brown fox jumps over the lazy dog while the cat watches '
    'from the window, unimpressed by the whole performance.',
)
TOP_FRAC = 0.05
MIN_JACCARD = 0.9
LAYERS = 8  # of SmolLM2's 30


def _related(params):
  """The params with each kernel's output channels moved by noise of
  lognormal scale (median 2.5% of the kernel's std), like a fine-tune that
  changes some channels much more than others."""
  key = jax.random.key(0)
  leaves, tree = jax.tree.flatten(params)
  out = []
  for i, x in enumerate(leaves):
    k1, k2 = jax.random.split(jax.random.fold_in(key, i))
    if x.ndim < 2:
      out.append(x)
      continue
    scale = 0.025 * jnp.exp(jax.random.normal(
        k1, x.shape[:-2] + (1,) + x.shape[-1:]))
    out.append(x + scale * jnp.std(x) * jax.random.normal(k2, x.shape))
  return jax.tree.unflatten(tree, out)


def _dots(jaxpr):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      yield eqn
  for sub in jax.extend.core.subjaxprs(jaxpr):
    yield from _dots(sub)


class ReductionPrecisionTest(absltest.TestCase):

  def test_reductions_are_float32_under_any_default_precision(self):
    # The reductions use no dot (whose default precision is bf16 passes on
    # TPU, TF32 on GPU): float32 elementwise work and sums, so no global
    # flag can lower them. Checked on the program and on the numbers.
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.bfloat16)
    m = jnp.asarray(rng.random((2, 5)) < 0.7, jnp.float32)
    fn = lambda h, m: capture.reduce_site(h, m, pairwise=False)
    with jax.default_matmul_precision('bfloat16'):
      jaxpr = jax.make_jaxpr(fn)(h, m)
      got = jax.jit(fn)(h, m)
    self.assertEqual(list(_dots(jaxpr.jaxpr)), [])
    h64 = np.asarray(h, np.float64).reshape(-1, 7)
    m64 = np.asarray(m, np.float64).reshape(-1, 1)
    want = {'sum': (h64 * m64).sum(0), 'sum_abs': np.abs(h64 * m64).sum(0),
            'sum_sq': (h64 * h64 * m64).sum(0)}
    for k, v in want.items():
      self.assertEqual(got[k].dtype, jnp.float32, k)
      np.testing.assert_allclose(np.asarray(got[k]), v, rtol=1e-6,
                                 atol=1e-6, err_msg=k)


class Bf16StatisticsTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    hf_dir = weights.smollm2_hf_dir()
    tok = models_io.load_tokenizer(hf_dir)
    dcfg = data.DataConfig(template='text', max_seq_len=48, batch_size=8)
    ex = data.tokenize_records([{'text': t} for t in TEXTS], tok,
                               dcfg).examples
    batches = data.make_batches(ex, 8, 48)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    cfg, base = hf.load_hf_params(hf_dir, mesh=mesh)
    # Tiny: the real model's first LAYERS layers (real weights throughout).
    cfg = cfg.replace(num_layers=LAYERS,
                      sliding_windows=cfg.sliding_windows[:LAYERS])
    base = dict(base, layers=jax.tree.map(lambda x: x[:LAYERS],
                                          base['layers']))
    other = _related(base)
    cls.sites = capture.OUTPUT_SITES
    cls.stats = {}
    for dtype in ('float32', 'bfloat16'):
      params = [jax.tree.map(lambda x: x.astype(dtype), p)
                for p in (base, other)]
      flat = collect.collect_stats(
          params, cfg.replace(dtype=dtype, param_dtype=dtype), batches,
          capture.CaptureSpec(cls.sites), mesh=mesh)
      cls.stats[dtype] = stats_io.as_stats(flat, stats_io.make_manifest(
          ['base', 'other'], cfg, cls.sites, {}, flat))

  def _jaccards(self, scores):
    masks = {d: localize.select_channels(s, 'per_site', TOP_FRAC)
             for d, s in scores.items()}
    return {site: float(analysis.overlap(
        {site: masks['float32'][site]},
        {site: masks['bfloat16'][site]})['jaccard']) for site in self.sites}

  def assert_agree(self, jac, what):
    print(f'bf16 vs fp32 top-{TOP_FRAC:.0%} Jaccard ({what}): ' +
          ', '.join(f'{s} {j:.3f}' for s, j in jac.items()))
    for site, j in jac.items():
      self.assertGreaterEqual(j, MIN_JACCARD, f'{what} {site}')

  def test_stats_are_float32_and_finite(self):
    for st in self.stats.values():
      for site in self.sites:
        for v in st.arrays[site].values():
          self.assertEqual(v.dtype, np.float32)
          self.assertTrue(np.isfinite(v).all())

  def test_mean_abs_channels_agree(self):
    scores = {d: {s: st.mean_abs(s)[0] for s in self.sites}
              for d, st in self.stats.items()}
    self.assert_agree(self._jaccards(scores), 'mean |h| of the base')

  def test_pairwise_score_channels_agree(self):
    scores = {d: localize.channel_scores(st.arrays, st.count, 1, 0,
                                         'mean_abs_diff')
              for d, st in self.stats.items()}
    self.assert_agree(self._jaccards(scores), 'mean_abs_diff')


if __name__ == '__main__':
  absltest.main()
