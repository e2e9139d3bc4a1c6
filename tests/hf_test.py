"""HF <-> params conversion: bitwise round trips, sharding, bf16, bad inputs.

Every bad checkpoint goes through `convert.convert_hf_to_params`, the
function the CLI runs, which must raise an error naming the file/key and
leave no output directory (nor a partial sibling) behind.
"""

import json
import os
import shutil
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file
import testutil
import torch
import transformers

from act_jax import convert
from act_jax.io import card
from act_jax.io import hf
from act_jax.io import hf_names
from act_jax.model.config import from_hf_config, to_hf_config


def state_dict_equal(test, a: torch.nn.Module, b: torch.nn.Module) -> None:
  sa, sb = a.state_dict(), b.state_dict()
  test.assertEqual(sorted(sa), sorted(sb))
  for k in sa:
    test.assertEqual(sa[k].dtype, sb[k].dtype, k)
    test.assertTrue(torch.equal(sa[k], sb[k]), f'{k} differs')


def rewrite_tensors(path: str, edit) -> None:
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path, metadata={'format': 'pt'})


class RoundTripTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.root = tempfile.mkdtemp(prefix='hf_convert_test_')
    self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)

  @parameterized.named_parameters(
      ('llama_f32', 'llama', torch.float32, {}),
      ('qwen2_tied_f32', 'qwen2', torch.float32,
       dict(tie_word_embeddings=True)),
      ('qwen3_bf16', 'qwen3', torch.bfloat16, {}),
  )
  def test_hf_params_hf_is_bitwise(self, family, dtype, overrides):
    src = f'{self.root}/src'
    model = testutil.make_tiny_hf(src, family, dtype=dtype, **overrides)
    cfg, params = hf.load_hf_params(src)
    want = {torch.float32: 'float32', torch.bfloat16: 'bfloat16'}[dtype]
    self.assertEqual(cfg.param_dtype, want)
    self.assertEqual({x.dtype.name for x in jax.tree.leaves(params)}, {want})
    out = f'{self.root}/out'
    hf.save_hf(params, cfg, out,
               hf_config=hf.read_hf_config_dict(src),
               tokenizer_dir=src, model_card=card.short_card(cfg, params))
    self.assertTrue(os.path.isfile(f'{out}/model.safetensors'))
    with open(f'{out}/README.md') as f:
      self.assertIn(f'({want})', f.read())  # the params' dtype
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    state_dict_equal(self, model, back)
    # Same loading path for the reference: `model.to(bf16)` also rounds the
    # non-persistent RoPE buffers, which from_pretrained keeps in float32.
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    tokens = torch.tensor(testutil.random_tokens(2, 12, cfg.vocab_size))
    with torch.no_grad():
      np.testing.assert_array_equal(back(tokens).logits.float().numpy(),
                                    model(tokens).logits.float().numpy())
    with open(f'{src}/config.json') as f:
      src_config = json.load(f)
    with open(f'{out}/config.json') as f:
      out_config = json.load(f)
    self.assertEqual(out_config, src_config)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    tok_src = transformers.AutoTokenizer.from_pretrained(src)
    self.assertEqual(tok.encode('Hi there!'), tok_src.encode('Hi there!'))
    self.assertGreater(len(tok.encode('Hi there!')), 5)

  def test_bf16_reads_exact_values(self):
    src = f'{self.root}/src'
    model = testutil.make_tiny_hf(src, 'llama', dtype=torch.bfloat16,
                                  tokenizer=False)
    cfg, params = hf.load_hf_params(src, param_dtype='float32')
    q = model.state_dict()['model.layers.1.self_attn.q_proj.weight']
    ours = np.asarray(params['layers']['self_attn']['q_proj']['kernel'][1])
    # bf16 -> f32 is exact, so the values agree bitwise after the transpose.
    np.testing.assert_array_equal(ours, q.float().numpy().T)
    _, params16 = hf.load_hf_params(src)
    emb = params16['embed_tokens']['embedding']
    self.assertEqual(emb.dtype, ml_dtypes.bfloat16)
    np.testing.assert_array_equal(
        np.asarray(emb).view(np.uint16),
        model.state_dict()['model.embed_tokens.weight'].view(
            torch.int16).numpy().view(np.uint16))
    self.assertEqual(cfg.param_dtype, 'float32')

  def test_sharded_export_with_index(self):
    src = f'{self.root}/src'
    model = testutil.make_tiny_hf(src, 'llama', tokenizer=False)
    cfg, params = hf.load_hf_params(src)
    out = f'{self.root}/out'
    hf.save_hf(params, cfg, out, max_shard_bytes=40_000)  # alias
    with open(f'{out}/{hf.INDEX_FILE}') as f:
      weight_map = json.load(f)['weight_map']
    files = sorted(set(weight_map.values()))
    self.assertGreater(len(files), 3)
    self.assertEqual(files[0], f'model-00001-of-{len(files):05d}.safetensors')
    self.assertEqual(set(weight_map), set(hf_names.hf_key_table(cfg)))
    self.assertFalse(os.path.exists(f'{out}/model.safetensors'))
    for name in files:  # no shard over the limit unless a lone big tensor
      tensors = load_file(f'{out}/{name}')
      self.assertTrue(len(tensors) == 1 or
                      sum(t.nbytes for t in tensors.values()) <= 40_000)
    state_dict_equal(self, model,
                     transformers.AutoModelForCausalLM.from_pretrained(out))
    _, again = hf.load_hf_params(out)
    jax.tree.map(np.testing.assert_array_equal, again, params)

  def test_failed_export_leaves_nothing(self):
    src = f'{self.root}/src'
    testutil.make_tiny_hf(src, 'llama', tokenizer=False)
    cfg, params = hf.load_hf_params(src)
    out = f'{self.root}/out'
    windowed = cfg.replace(sliding_windows=(4, 0))  # llama cannot say this
    with self.assertRaisesRegex(hf.ConversionError, 'sliding window'):
      hf.save_hf(params, windowed, out)
    params['layers']['mlp']['up_proj']['kernel'] = params['layers']['mlp'][
        'up_proj']['kernel'][:, :, :-1]
    with self.assertRaisesRegex(ValueError, r'layers\.mlp\.up_proj\.kernel'):
      hf.save_hf(params, cfg, out)
    self.assertEqual(sorted(os.listdir(self.root)), ['src'])

  @parameterized.named_parameters(
      ('mistral_window', 'mistral', dict(sliding_window=8)),
      ('qwen2_window_layers', 'qwen2',
       dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
      ('qwen3_bias', 'qwen3', dict(attention_bias=True)),
      ('llama3_rope', 'llama',
       dict(rope_parameters=dict(rope_type='llama3', rope_theta=5e5,
                                 factor=8.0, low_freq_factor=1.0,
                                 high_freq_factor=4.0,
                                 original_max_position_embeddings=64))),
  )
  def test_config_rebuilt_without_source(self, family, overrides):
    hf_dir = f'{self.root}/cfg'
    testutil.tiny_hf_config(family, **overrides).save_pretrained(hf_dir)
    cfg = hf.load_hf_config(hf_dir)
    out = f'{self.root}/rebuilt'
    os.makedirs(out)
    with open(f'{out}/config.json', 'w') as f:
      json.dump(to_hf_config(cfg), f)
    loaded = transformers.AutoConfig.from_pretrained(out)
    self.assertEqual(from_hf_config(loaded.to_dict()), cfg)


class BadInputTest(parameterized.TestCase):
  """Each broken checkpoint: a clear error, and no output directory."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp(prefix='hf_convert_bad_')
    cls.single = f'{cls.root}/single'
    model = testutil.make_tiny_hf(cls.single, 'llama', tokenizer=False)
    cls.sharded = f'{cls.root}/sharded'
    model.save_pretrained(cls.sharded, max_shard_size='40KB')

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  def setUp(self):
    super().setUp()
    self.work = tempfile.mkdtemp(dir=self.root)
    self.addCleanup(shutil.rmtree, self.work, ignore_errors=True)

  def copy(self, sharded: bool = False) -> str:
    dst = f'{self.work}/hf'
    shutil.copytree(self.sharded if sharded else self.single, dst)
    return dst

  def assert_fails(self, hf_dir: str, *fragments: str) -> str:
    out_parent = f'{self.work}/outputs'
    os.makedirs(out_parent)
    params_dir = f'{out_parent}/params'
    with self.assertRaises((hf.ConversionError, ValueError)) as ctx:
      convert.convert_hf_to_params(hf_dir, params_dir)
    msg = str(ctx.exception)
    for fragment in fragments:
      self.assertIn(fragment, msg)
    self.assertEqual(os.listdir(out_parent), [])  # no output, no partial
    return msg

  def index(self, hf_dir: str) -> tuple[str, dict]:
    path = f'{hf_dir}/{hf.INDEX_FILE}'
    with open(path) as f:
      return path, json.load(f)

  def test_good_sharded_checkpoint_converts(self):
    hf_dir = self.copy(sharded=True)
    shards = sorted(set(self.index(hf_dir)[1]['weight_map'].values()))
    self.assertGreater(len(shards), 1)
    # HF hub cache layout: shards are symlinks into a blobs dir; accepted
    # with follow_symlinks only (a link out of a checkpoint may be anything).
    os.makedirs(f'{self.work}/blobs')
    os.rename(f'{hf_dir}/{shards[0]}', f'{self.work}/blobs/x')
    os.symlink(f'{self.work}/blobs/x', f'{hf_dir}/{shards[0]}')
    params_dir = f'{self.work}/params'
    with self.assertRaisesRegex(ValueError, 'is a symlink to .*blobs/x'):
      convert.convert_hf_to_params(hf_dir, params_dir)
    cfg = convert.convert_hf_to_params(hf_dir, params_dir,
                                       follow_symlinks=True)
    self.assertEqual(cfg.model_type, 'llama')
    self.assertTrue(os.path.isdir(f'{params_dir}/params'))

  def test_missing_config(self):
    hf_dir = self.copy()
    os.remove(f'{hf_dir}/config.json')
    self.assert_fails(hf_dir, f'{hf_dir}/config.json', 'missing config.json')

  def test_unsupported_model_type(self):
    hf_dir = self.copy()
    with open(f'{hf_dir}/config.json') as f:
      config = json.load(f)
    config['model_type'] = 'gpt2'
    with open(f'{hf_dir}/config.json', 'w') as f:
      json.dump(config, f)
    self.assert_fails(hf_dir, 'config.json', "'gpt2'",
                      'llama, mistral, qwen2, qwen3')

  def test_index_names_missing_shard(self):
    hf_dir = self.copy(sharded=True)
    _, index = self.index(hf_dir)
    victim = sorted(set(index['weight_map'].values()))[1]
    os.remove(f'{hf_dir}/{victim}')
    self.assert_fails(hf_dir, victim, 'does not exist')

  @parameterized.named_parameters(('dotdot', '../outside.safetensors'),
                                  ('absolute', '/tmp/outside.safetensors'))
  def test_index_names_file_outside_dir(self, name):
    hf_dir = self.copy(sharded=True)
    path, index = self.index(hf_dir)
    first = sorted(set(index['weight_map'].values()))[0]
    # The outside file exists and is valid: it must still be refused.
    outside = os.path.normpath(os.path.join(hf_dir, name))
    if not os.path.isabs(name):
      shutil.copyfile(f'{hf_dir}/{first}', outside)
    for key, file in index['weight_map'].items():
      if file == first:
        index['weight_map'][key] = name
    with open(path, 'w') as f:
      json.dump(index, f)
    self.assert_fails(hf_dir, hf.INDEX_FILE, repr(name))

  def test_truncated_safetensors(self):
    hf_dir = self.copy()
    path = f'{hf_dir}/model.safetensors'
    size = os.path.getsize(path)
    with open(path, 'r+b') as f:
      f.truncate(size // 2)
    self.assert_fails(hf_dir, path, 'corrupt or truncated')

  def test_wrong_shape_tensor(self):
    hf_dir = self.copy()
    key = 'model.layers.1.mlp.up_proj.weight'
    rewrite_tensors(f'{hf_dir}/model.safetensors',
                    lambda t: t.update({key: t[key][:, :-1].copy()}))
    self.assert_fails(hf_dir, key, f'{hf_dir}/model.safetensors',
                      'expected shape (96, 64)', 'found (96, 63)')

  def test_extra_unknown_tensor(self):
    hf_dir = self.copy()
    key = 'model.layers.0.mlp.extra_proj.weight'
    rewrite_tensors(f'{hf_dir}/model.safetensors',
                    lambda t: t.update({key: np.zeros((2, 2), np.float32)}))
    self.assert_fails(hf_dir, 'unexpected tensor', key)

  def test_missing_tensor(self):
    hf_dir = self.copy()
    key = 'model.layers.0.self_attn.k_proj.weight'
    rewrite_tensors(f'{hf_dir}/model.safetensors', lambda t: t.pop(key))
    self.assert_fails(hf_dir, 'missing tensor', key)

  def test_missing_tensor_in_sharded_index(self):
    hf_dir = self.copy(sharded=True)
    path, index = self.index(hf_dir)
    key = 'lm_head.weight'
    shard = f'{hf_dir}/{index["weight_map"][key]}'
    rewrite_tensors(shard, lambda t: t.pop(key))
    self.assert_fails(hf_dir, key, shard)


if __name__ == '__main__':
  absltest.main()
