"""Orbax params dirs: bitwise round trips, mesh restore, mismatches, CLI."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

from absl import flags
from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import testutil
import torch
import transformers

from act_jax.io import atomic
from act_jax.io import params as params_io
from act_jax import convert
from act_jax.model import forward
from act_jax.io import hf
from act_jax.io import models as models_io
from act_jax.model import sharding
from act_jax.model.config import from_hf_config

CFG = from_hf_config(testutil.tiny_hf_config('qwen2').to_dict())


def bits(x) -> np.ndarray:
  """Raw bits of an array, so comparisons are bitwise for any float dtype."""
  x = np.asarray(x)
  return x.view(np.dtype(f'u{x.dtype.itemsize}'))


def assert_trees_bitwise(a, b) -> None:
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(bits(x), bits(y)),
               a, b)


class ParamsDirTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # A converted random HF model: no init compile needed.
    cls.tmp = tempfile.mkdtemp(prefix='checkpoint_test_hf_')
    testutil.make_tiny_hf(cls.tmp, 'qwen2', tokenizer=False)
    cfg, cls.params = hf.load_hf_params(cls.tmp)
    assert cfg == CFG, cfg

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def setUp(self):
    super().setUp()
    self.root = tempfile.mkdtemp(prefix='checkpoint_test_')
    self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)

  @parameterized.named_parameters(('f32', 'float32'), ('bf16', 'bfloat16'))
  def test_round_trip_is_bitwise(self, dtype):
    params = jax.tree.map(lambda x: x.astype(dtype), self.params)
    path = f'{self.root}/params_dir'
    params_io.save_params_dir(path, params, CFG, meta={'seed': 0})
    self.assertEqual(sorted(os.listdir(self.root)), ['params_dir'])
    cfg, back = params_io.load_params_dir(path)
    self.assertEqual(cfg, CFG.replace(param_dtype=dtype))
    self.assertEqual({x.dtype for x in jax.tree.leaves(back)},
                     {jnp.dtype(dtype)})
    assert_trees_bitwise(back, params)
    with open(f'{path}/meta.json') as f:
      self.assertEqual(json.load(f), {'seed': 0})

  def test_restore_onto_mesh(self):
    path = f'{self.root}/params_dir'
    params_io.save_params_dir(path, self.params, CFG)
    mesh = sharding.make_mesh((2, 2, 2))
    cfg, back = params_io.load_params_dir(path, mesh=mesh)
    want = sharding.tree_shardings(mesh, forward.logical_axes(cfg),
                                   forward.abstract_params(cfg))
    jax.tree.map(lambda x, s: self.assertEqual(x.sharding, s), back, want)
    q = back['layers']['self_attn']['q_proj']['kernel']
    self.assertEqual(q.sharding.spec, jax.sharding.PartitionSpec(
        None, 'fsdp', 'tensor'))
    self.assertLen(q.addressable_shards, 8)
    assert_trees_bitwise(back, self.params)
    _, cast = params_io.load_params_dir(path, mesh=mesh,
                                        param_dtype='bfloat16')
    self.assertEqual(cast['norm']['scale'].dtype, jnp.bfloat16)

  def test_mismatch_names_first_leaf(self):
    path = f'{self.root}/params_dir'
    params_io.save_params_dir(path, self.params, CFG)
    config_path = f'{path}/{params_io.MODEL_CONFIG}'
    with open(config_path) as f:
      config = json.load(f)
    bad = dict(config, intermediate_size=CFG.intermediate_size + 32)
    with open(config_path, 'w') as f:
      json.dump(bad, f)
    with self.assertRaisesRegex(params_io.CheckpointError,
                                r'layers\.mlp\.down_proj\.kernel is '
                                r'\(2, 96, 64\) float32, expected '
                                r'\(2, 128, 64\) float32'):
      params_io.load_params_dir(path)
    with open(config_path, 'w') as f:
      json.dump(dict(config, param_dtype='bfloat16'), f)
    with self.assertRaisesRegex(params_io.CheckpointError,
                                r'embed_tokens\.embedding is .* float32, '
                                r'expected .* bfloat16'):
      params_io.load_params_dir(path)

  def test_save_rejects_wrong_tree_and_leaves_nothing(self):
    params = jax.tree.map(lambda x: x, self.params)
    params['norm']['scale'] = jnp.ones((3,))
    with self.assertRaisesRegex(params_io.CheckpointError, r'norm\.scale'):
      params_io.save_params_dir(f'{self.root}/p', params, CFG)
    del params['norm']
    with self.assertRaisesRegex(params_io.CheckpointError,
                                r'missing param norm\.scale'):
      params_io.save_params_dir(f'{self.root}/p', params, CFG)
    self.assertEqual(os.listdir(self.root), [])

  def test_atomic_dir(self):
    path = f'{self.root}/out'
    with self.assertRaisesRegex(RuntimeError, 'boom'):
      with atomic.atomic_dir(path) as tmp:
        with open(f'{tmp}/half', 'w') as f:
          f.write('x')
        raise RuntimeError('boom')
    self.assertEqual(os.listdir(self.root), [])
    with atomic.atomic_dir(path) as tmp:
      open(f'{tmp}/a', 'w').close()
    with self.assertRaises(FileExistsError):
      with atomic.atomic_dir(path):
        pass
    with atomic.atomic_dir(path, overwrite=True) as tmp:
      open(f'{tmp}/b', 'w').close()
    self.assertEqual(sorted(os.listdir(path)), [atomic.MARKER, 'b'])
    self.assertEqual(os.listdir(self.root), ['out'])

  def test_generic_pytree(self):
    tree = {'counts': jnp.arange(6, dtype=jnp.int32).reshape(2, 3),
            'stats': {'sum': jnp.linspace(0, 1, 16, dtype=jnp.float32)}}
    path = f'{self.root}/tree'
    params_io.save_pytree(path, tree)
    assert_trees_bitwise(params_io.restore_pytree(path), tree)
    mesh = sharding.make_mesh((-1, 1, 1))
    shardings = {'counts': sharding.replicated(mesh),
                 'stats': {'sum': sharding.named_sharding(mesh, ('batch',))}}
    back = params_io.restore_pytree(path, shardings)
    self.assertEqual(back['stats']['sum'].sharding,
                     shardings['stats']['sum'])
    assert_trees_bitwise(back, tree)
    meta = params_io.pytree_metadata(path)
    self.assertEqual(tuple(meta['counts'].shape), (2, 3))
    with self.assertRaisesRegex(params_io.CheckpointError, 'nowhere'):
      params_io.restore_pytree(f'{self.root}/nowhere')


class CliTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.root = tempfile.mkdtemp(prefix='convert_cli_test_')
    self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)

  def test_flag_validation(self):
    hf_dir = f'{self.root}/hf'
    os.makedirs(hf_dir)
    argv = ['convert', f'--hf_dir={hf_dir}']
    cases = ((argv, '--params_dir is required'),
             (argv + [f'--params_dir={hf_dir}'], 'must differ'),
             (argv + ['--to_hf', f'--params_dir={self.root}/x'],
              'not a directory'),
             (argv + [f'--params_dir={self.root}'], 'contains an input'),
             (argv + [f'--params_dir={self.root}/other'], 'already exists'))
    os.makedirs(f'{self.root}/other')
    for args, message in cases:
      flags.FLAGS.unparse_flags()
      flags.FLAGS(args)
      try:
        with self.assertRaisesRegex(convert.app.UsageError, message):
          convert._check_flags()  # pylint: disable=protected-access
      finally:
        flags.FLAGS.unparse_flags()

  def test_cli_round_trip(self):
    hf_dir, params_dir, out_dir = (f'{self.root}/{n}'
                                   for n in ('hf', 'params', 'hf_out'))
    model = testutil.make_tiny_hf(hf_dir, 'llama', seed=3)
    env = dict(os.environ, JAX_PLATFORMS='cpu', HF_HUB_OFFLINE='1')
    env.pop('XLA_FLAGS', None)
    run = lambda *args: subprocess.run(
        [sys.executable, '-m', 'act_jax.convert', *args], env=env,
        capture_output=True, text=True, timeout=300, check=False)
    first = run(f'--hf_dir={hf_dir}', f'--params_dir={params_dir}',
                '--param_dtype=bfloat16')
    self.assertEqual(first.returncode, 0, first.stderr[-3000:])
    self.assertIn('converted', first.stderr)
    for name in ('model_config.json', 'hf_config.json', 'tokenizer.json',
                 'params'):
      self.assertTrue(os.path.exists(f'{params_dir}/{name}'), name)
    second = run('--to_hf', f'--params_dir={params_dir}',
                 f'--hf_dir={out_dir}', '--max_shard_bytes=50000')
    self.assertEqual(second.returncode, 0, second.stderr[-3000:])
    self.assertTrue(os.path.isfile(f'{out_dir}/model.safetensors.index.json'))
    with open(f'{out_dir}/README.md') as f:  # the card says where it came from
      self.assertIn(params_dir, f.read())
    back = transformers.AutoModelForCausalLM.from_pretrained(out_dir)
    self.assertEqual(back.dtype, torch.bfloat16)
    want = model.to(torch.bfloat16).state_dict()
    for k, v in back.state_dict().items():
      self.assertTrue(torch.equal(v, want[k]), k)
    cfg, _ = models_io.load_model(params_dir)
    self.assertEqual(cfg.param_dtype, 'bfloat16')
    self.assertEqual(models_io.load_model(out_dir)[0], cfg)
    tok = models_io.load_tokenizer(out_dir)
    self.assertEqual(tok.pad_token, '<pad>')


if __name__ == '__main__':
  absltest.main()
