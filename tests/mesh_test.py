"""config.mesh_shape: parsed once, checked before heavy work, enforced.

On the 8 fake CPU devices of conftest.py: a malformed or non-dividing mesh,
a batch size the data x fsdp axes do not divide, or a param dimension its
mesh axis does not divide are pre-flight errors naming both; a stage body
that places arrays anywhere but the configured mesh (a library call
without `mesh=` falls back to a default mesh or one device) fails.
"""

import os

from absl.testing import absltest
import jax
import numpy as np

import testutil
from act_jax.model import forward
from act_jax.model import sharding
from act_jax.model.config import ModelConfig
from act_jax.pipeline import jobs
from act_jax.pipeline import preflight
from act_jax.pipeline import runner
from act_jax.pipeline import stages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(model_type='llama', vocab_size=64, hidden_size=32,
                  intermediate_size=36, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8)


def _plan(mesh_shape='', **sections):
  c = testutil.load_config(os.path.join(REPO, 'configs', 'demo.py'), 'tiny')
  c.mesh_shape = mesh_shape
  for key, value in sections.items():
    sec, field = key.split('__')
    c[sec][field] = value
  return jobs.plan_from_config(c, '/tmp/unused')


class MeshConfigTest(absltest.TestCase):

  def test_parse_mesh_shape(self):
    self.assertEqual(jobs.parse_mesh_shape(''), (-1, 1, 1))
    self.assertEqual(jobs.parse_mesh_shape('1, 2,4'), (1, 2, 4))
    self.assertEqual(_plan('2,-1,1').mesh_shape, (2, -1, 1))
    for bad in ('1,2', '1,x,1', '0,8,1', '-1,-1,8', '1,2,3,4'):
      with self.assertRaisesRegex(jobs.ConfigError, 'mesh_shape'):
        jobs.parse_mesh_shape(bad)

  def test_mesh_must_divide_the_devices(self):
    mesh = preflight.check_mesh(_plan('1,2,4'))
    self.assertEqual(sharding.describe(mesh),
                     {'axes': {'data': 1, 'fsdp': 2, 'tensor': 4},
                      'devices': 8})
    self.assertEqual(dict(preflight.check_mesh(_plan('')).shape),
                     {'data': 8, 'fsdp': 1, 'tensor': 1})
    with self.assertRaisesRegex(preflight.PreflightError,
                                r'mesh_shape=1,3,1 \(3 devices\) does not '
                                r'divide the 8 devices'):
      preflight.check_mesh(_plan('1,3,1'))
    with self.assertRaisesRegex(preflight.PreflightError, '1,2,2.*8 devices'):
      preflight.check_mesh(_plan('1,2,2'))
    with self.assertRaisesRegex(preflight.PreflightError, '-1,3,1'):
      preflight.check_mesh(_plan('-1,3,1'))

  def test_batch_sizes_must_divide_the_batch_axes(self):
    with self.assertRaisesRegex(
        preflight.PreflightError,
        r'collect.batch_size=12 does not divide over the mesh batch axes '
        r'data x fsdp = 1 x 8 of --config.mesh_shape=1,8,1'):
      preflight.check_mesh(_plan('1,8,1', collect__batch_size=12))
    with self.assertRaisesRegex(preflight.PreflightError,
                                r'train.batch_size=6 .* 2 x 2'):
      preflight.check_mesh(_plan('2,2,2', train__batch_size=6))

  def test_param_dimension_must_divide_its_axis(self):
    mesh = sharding.make_mesh((1, 1, 8))
    bad = sharding.indivisible(mesh, forward.logical_axes(CFG),
                               forward.abstract_params(CFG))
    self.assertIn(('layers.mlp.up_proj.kernel', 'mlp', 36, ('tensor',), 8),
                  bad)
    with self.assertRaisesRegex(preflight.PreflightError,
                                r'model m \(/x\): param .* = 36, which mesh '
                                r'axis tensor = 8 of --config.mesh_shape='
                                r'1,1,8 does not divide'):
      preflight.check_model_mesh(CFG, mesh, 'model m (/x)')
    preflight.check_model_mesh(CFG, sharding.make_mesh((2, 2, 2)), 'ok')


class StageMeshTest(absltest.TestCase):

  def test_a_stage_off_the_configured_mesh_fails(self):
    mesh = sharding.make_mesh((1, 4, 2))
    params = forward.init_params(CFG, jax.random.key(0))

    def good(ctx):
      del ctx
      sh = sharding.tree_shardings(mesh, forward.logical_axes(CFG), params)
      return jax.device_put(params, sh) and {'ok': 1}

    self.assertEqual(stages.on_mesh('s', mesh, good)(None), {'ok': 1})
    for name, body in (
        ('default mesh', lambda ctx: sharding.make_mesh()),
        ('one device', lambda ctx: sharding.single_device())):
      with self.subTest(name):
        with self.assertRaisesRegex(runner.StageError,
                                    "stage 's' placed arrays on"):
          stages.on_mesh('s', mesh, body)(None)

  def test_put_and_to_host_round_trip(self):
    mesh = sharding.make_mesh((2, 2, 2))
    x = np.arange(32, dtype=np.float32).reshape(8, 4)
    sh = sharding.named_sharding(mesh, ('batch', 'embed'), x.shape)
    g = sharding.put({'a': x}, sh)['a']
    self.assertEqual(g.sharding, sh)
    self.assertIs(sharding.put(g, sh), g)
    np.testing.assert_array_equal(sharding.to_host(g), x)


if __name__ == '__main__':
  absltest.main()
