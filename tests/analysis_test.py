"""Tests for act_jax.analysis and act_jax.plots."""

import json
import os
import tempfile

from absl.testing import absltest
import numpy as np

from act_jax.act import analysis
from act_jax.pipeline import plots


class AnalysisTest(absltest.TestCase):

  def test_expected_random_jaccard(self):
    self.assertAlmostEqual(analysis.expected_random_jaccard(5, 5, 5), 1.0)
    self.assertAlmostEqual(analysis.expected_random_jaccard(1, 1, 2), 0.5)
    self.assertEqual(analysis.expected_random_jaccard(0, 0, 9), 0.0)
    rng = np.random.default_rng(0)
    n, a, b = 40, 6, 10
    sims = []
    for _ in range(20000):
      x = set(rng.choice(n, a, replace=False))
      y = set(rng.choice(n, b, replace=False))
      sims.append(len(x & y) / len(x | y))
    self.assertAlmostEqual(analysis.expected_random_jaccard(a, b, n),
                           np.mean(sims), delta=0.003)

  def test_concentration(self):
    s = np.zeros((2, 20))
    s[0, 7] = 5.0
    s[1] = 1.0
    conc = analysis.concentration({'mlp.up_proj': s})
    per = conc['sites']['mlp.up_proj']['per_layer']
    self.assertEqual(per['0.5'], [0.05, 0.5])
    self.assertEqual(per['0.9'], [0.05, 0.9])
    curve = conc['sites']['mlp.up_proj']['curve']
    self.assertTrue(np.all(np.diff(curve) >= -1e-12))
    self.assertAlmostEqual(curve[-1], 1.0)
    json.dumps(conc)

  def test_overlap_and_plots(self):
    a = {'s': np.zeros((1, 10), bool)}
    b = {'s': np.zeros((1, 10), bool)}
    a['s'][0, :4] = True
    b['s'][0, 2:6] = True
    o = analysis.overlap(a, b)
    self.assertAlmostEqual(o['jaccard'], 2 / 6)
    self.assertAlmostEqual(o['sites']['s']['random_expected'],
                           analysis.expected_random_jaccard(4, 4, 10))
    self.assertAlmostEqual(analysis.overlap(a, a)['jaccard'], 1.0)
    d = analysis.disentanglement({'x': a, 'y': b, 'z': a})
    self.assertEqual(sorted(d), ['x|y', 'x|z', 'y|z'])
    json.dumps(d)
    tmp = tempfile.mkdtemp()
    conc = analysis.concentration({'s': np.random.default_rng(0).random(
        (3, 10))})
    for p in (plots.concentration_heatmap(conc, os.path.join(tmp, 'h.png')),
              plots.concentration_curves(conc, os.path.join(tmp, 'c.png')),
              plots.overlap_bars(d, os.path.join(tmp, 'o.png'))):
      with open(p, 'rb') as f:
        self.assertEqual(f.read(8), b'\x89PNG\r\n\x1a\n')


if __name__ == '__main__':
  absltest.main()
