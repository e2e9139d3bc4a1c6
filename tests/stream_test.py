"""Out-of-core transfer (act.stream) equals the in-memory trees.

Four tiny HF checkpoints (a qwen2 base with biases and three perturbed
copies, written by transformers) are merged by every method twice: whole
trees in memory (`act.transfer`, `act.baselines`) and one tensor at a time
from the safetensors files into small output shards. The streamed
checkpoint must be a valid HF directory (index, shards, config) holding the
same tensors; bf16 inputs give bf16 outputs.
"""

import json
import os
import tempfile
import types

from absl.testing import absltest
import jax
import numpy as np
import torch

import testutil
from act_jax import transfer as transfer_cli
from act_jax.act import baselines
from act_jax.act import localize
from act_jax.act import masks as masks_lib
from act_jax.act import stream
from act_jax.act import transfer
from act_jax.io import hf


def _leaves(params):
  return {jax.tree_util.keystr(p): np.asarray(x, np.float32)
          for p, x in jax.tree_util.tree_leaves_with_path(params)}


class StreamTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.dirs = []
    for i in range(4):
      d = os.path.join(cls.tmp, f'm{i}')
      model = testutil.make_tiny_hf(d, 'qwen2', seed=0, num_hidden_layers=3)
      if i:
        torch.manual_seed(100 + i)
        with torch.no_grad():
          for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        model.save_pretrained(d)
      cls.dirs.append(d)
    loaded = [hf.load_hf_params(d) for d in cls.dirs]
    cls.cfg = loaded[0][0]
    cls.params = [p for _, p in loaded]
    shapes = masks_lib.site_shapes(cls.cfg)
    cls.masks = []
    for i in range(3):
      s = localize.random_scores(shapes, seed=i)
      cls.masks.append(localize.select_channels(s, top_frac=0.3))
    cls.scores = [localize.random_scores(shapes, seed=10 + i)
                  for i in range(3)]

  def _stream(self, name, method, sources, **kw):
    out = os.path.join(self.tmp, name)
    stream.transfer_checkpoints(method, self.dirs[0], sources, out,
                                max_shard_bytes=40_000, **kw)
    return out

  def assert_same(self, out_dir, want, atol=0.0):
    with open(os.path.join(out_dir, hf.INDEX_FILE)) as f:
      self.assertGreater(len(set(json.load(f)['weight_map'].values())), 2)
    _, got = hf.load_hf_params(out_dir)
    want, got = _leaves(want), _leaves(got)
    self.assertEqual(set(want), set(got))
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=0, atol=atol,
                                 err_msg=k)

  def test_transplant_and_merges_equal_in_memory(self):
    p, m = self.params, self.masks
    out = self._stream('plant', 'act', self.dirs[1:2], masks=m[:1],
                       include=('norm.scale',))
    self.assert_same(out, transfer.transplant_channels(
        p[0], p[1], m[0], include=('norm.scale',)))
    for policy in ('average', 'max_score', 'priority'):
      kw = dict(policy=policy, scores=self.scores, priority=[2, 0, 1],
                include=('embed_tokens.*',))
      out = self._stream(f'merge_{policy}', 'act', self.dirs[1:], masks=m,
                         **kw)
      want, rep = transfer.merge(p[0], p[1:], m, **kw)
      self.assertGreater(rep['num_conflicts'], 0)
      self.assert_same(out, want, atol=1e-7)
      with open(os.path.join(out, stream.REPORT_FILE)) as f:
        self.assertEqual(json.load(f)['merge_report']['num_conflicts'],
                         rep['num_conflicts'])

  def test_baselines_equal_in_memory(self):
    p = self.params
    cases = [
        ('linear1', 'linear', 1, dict(interp_t=0.3),
         baselines.linear_interpolation(p[0], p[1], 0.3)),
        ('linear3', 'linear', 3, {}, baselines.average(p[1:])),
        ('ta', 'task_arithmetic', 3, dict(lam=0.7),
         baselines.task_arithmetic(p[0], p[1:], 0.7)),
        ('ties', 'ties', 3, dict(density=0.3),
         baselines.ties(p[0], p[1:], 0.3)),
        ('dare', 'dare', 3, dict(drop=0.5, seed=3),
         baselines.dare(p[0], p[1:], 0.5, seed=3)),
        ('dare_ties', 'dare', 3, dict(drop=0.5, seed=3, combine='ties',
                                      density=1.0),
         baselines.dare(p[0], p[1:], 0.5, seed=3, combine='ties')),
    ]
    for name, method, k, kw, want in cases:
      out = self._stream(name, method, self.dirs[1:1 + k], **kw)
      with self.subTest(name):
        self.assert_same(out, want, atol=2e-6)

  def test_cli_streams_hf_to_hf_and_keeps_bf16(self):
    bf = []
    for i in range(2):
      d = os.path.join(self.tmp, f'bf{i}')
      testutil.make_tiny_hf(d, 'qwen2', seed=i, dtype=torch.bfloat16)
      bf.append(d)
    out = os.path.join(self.tmp, 'cli_ties')
    flags = dict(method='ties', target=bf[0], source=[bf[1]], masks=None,
                 out=None, hf_out=out, include=[], unit='channel',
                 priority=None, allow_other_models=False, overwrite=False,
                 max_shard_bytes=2**30, policy='average', alpha=1.0,
                 interp_t=0.5, ta_lambda=0.5, ties_density=0.4,
                 dare_drop=0.9, seed=0, follow_symlinks=False)
    transfer_cli.run_cli(types.SimpleNamespace(**flags))
    cfg, got = hf.load_hf_params(out)
    self.assertEqual(cfg.param_dtype, 'bfloat16')
    _, b0 = hf.load_hf_params(bf[0])
    _, b1 = hf.load_hf_params(bf[1])
    want = baselines.ties(b0, [b1], 0.4)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      self.assertEqual(x.dtype, y.dtype)
      np.testing.assert_allclose(np.asarray(x, np.float32),
                                 np.asarray(y, np.float32), atol=1e-2)
    with open(os.path.join(out, stream.REPORT_FILE)) as f:
      self.assertEqual(json.load(f)['method'], 'ties')

  def test_bad_inputs_fail_before_writing(self):
    out = os.path.join(self.tmp, 'bad')
    with self.assertRaisesRegex(transfer.TransferError, 'method'):
      stream.transfer_checkpoints('nope', self.dirs[0], self.dirs[1:], out)
    with self.assertRaisesRegex(transfer.TransferError, '1 masks for 2'):
      stream.transfer_checkpoints('act', self.dirs[0], self.dirs[1:3], out,
                                  masks=self.masks[:1])
    other = os.path.join(self.tmp, 'other')
    testutil.make_tiny_hf(other, 'qwen2', seed=0, intermediate_size=80)
    with self.assertRaisesRegex(ValueError, 'intermediate_size'):
      stream.transfer_checkpoints('ties', self.dirs[0], [other], out)
    self.assertFalse(os.path.exists(out))


if __name__ == '__main__':
  absltest.main()
