"""Tests for act_jax.baselines against an independent reference.

Reference: mergekit 0.1.5 (`pip install mergekit==0.1.5`, torch stays
2.13.0+cpu), its registered merge methods called per HF tensor on the torch
state dicts of tiny random transformers checkpoints written with
`testutil.make_tiny_hf`; our side loads the same safetensors with
`hf.load_hf_params`. DARE's random drop cannot share mergekit's
torch RNG, so DARE is checked by feeding our exact drop-and-rescale deltas
(`baselines.dare_keep_mask`) into mergekit's task_arithmetic / ties with
density 1, plus the paper's 1 / (1 - p) rescale and seeded determinism.
"""

import os
import tempfile

from absl.testing import absltest
import jax
import numpy as np
import torch

from act_jax.act import baselines
from act_jax.io import hf
from act_jax.io import hf_names
from act_jax.act import masks as masks_lib
from act_jax.act import transfer
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import TensorGroup
import testutil


def _mergekit(method, tensors, **params):
  """mergekit `method` over [base, *sources] (base first)."""
  k = len(tensors) - 1
  density = params.pop('density', 1.0)
  group = TensorGroup.from_tensors(tensors, base_index=0)
  kw = dict(int8_mask=False, normalize=method != 'task_arithmetic',
            rescale=False, weight={i: 1.0 for i in range(1, k + 1)},
            density={i: density for i in range(1, k + 1)})
  kw['lambda'] = params.pop('lam', 1.0)
  if method == 'task_arithmetic':
    kw['density'] = {i: 1.0 for i in range(1, k + 1)}
  return registry.get(method).merge_group(group, **kw)


def _ours_hf(params, entry):
  """Our leaf for one HF tensor, in HF layout."""
  x = params
  for p in entry.path:
    x = x[p]
  x = np.asarray(x)
  if entry.layer is not None:
    x = x[entry.layer]
  return x.T if entry.transpose else x


class BaselinesTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    base_dir = os.path.join(cls.tmp, 'base')
    base = testutil.make_tiny_hf(base_dir, 'qwen2', seed=0, tokenizer=False,
                                 num_hidden_layers=2, hidden_size=32,
                                 intermediate_size=48, head_dim=8)
    cls.dirs = [base_dir]
    cls.torch_sd = [{k: v.clone() for k, v in base.state_dict().items()}]
    for i in (1, 2, 3):
      torch.manual_seed(10 + i)
      with torch.no_grad():
        for p in base.parameters():
          p.add_(torch.randn_like(p) * 0.01)  # a "fine-tune" of the base
      d = os.path.join(cls.tmp, f's{i}')
      base.save_pretrained(d)
      cls.dirs.append(d)
      cls.torch_sd.append({k: v.clone() for k, v in base.state_dict().items()})
      with torch.no_grad():  # back to the base for the next source
        for k, p in base.named_parameters():
          p.copy_(cls.torch_sd[0][k])
    loaded = [hf.load_hf_params(d) for d in cls.dirs]
    cls.cfg = loaded[0][0]
    cls.params = [p for _, p in loaded]
    cls.entries = list(hf_names.hf_entries(cls.cfg))

  def _compare(self, ours, method, atol=2e-6, **params):
    for e in self.entries:
      ref = _mergekit(method, [sd[e.hf_key] for sd in self.torch_sd],
                      **dict(params)).numpy()
      np.testing.assert_allclose(_ours_hf(ours, e), ref, atol=atol, rtol=0,
                                 err_msg=f'{method} {e.hf_key}')

  def test_task_arithmetic_matches_mergekit(self):
    ours = baselines.task_arithmetic(self.params[0], self.params[1:],
                                     lam=0.7)
    self._compare(ours, 'task_arithmetic', lam=0.7)

  def test_ties_matches_mergekit(self):
    ours = baselines.ties(self.params[0], self.params[1:], density=0.3,
                          lam=1.0)
    self._compare(ours, 'ties', density=0.3)

  def test_dare_matches_reference_with_same_drop(self):
    # The MLP sub-tree keeps this test's compile count low; TA / TIES above
    # cover every leaf.
    p, seed = 0.7, 3
    key = jax.random.key(seed)
    trees = [{'layers': {'mlp': t['layers']['mlp']}} for t in self.params]
    base_l, treedef = jax.tree_util.tree_flatten(trees[0])
    dropped = []
    for i, src in enumerate(trees[1:]):
      leaves = []
      for j, (b, s) in enumerate(zip(base_l, jax.tree.leaves(src))):
        keep = np.asarray(baselines.dare_keep_mask(key, i, j, tuple(b.shape),
                                                   p, layered=True))
        d = np.asarray(s, np.float64) - np.asarray(b, np.float64)
        leaves.append(np.asarray(b) + np.where(keep, d / (1 - p), 0))
      dropped.append(jax.tree_util.tree_unflatten(treedef, leaves))
    entries = [e for e in self.entries if e.path[:2] == ('layers', 'mlp')]
    for combine in ('task_arithmetic', 'ties'):
      ours = baselines.dare(trees[0], trees[1:], drop=p, seed=seed,
                            combine=combine)
      for e in entries:
        tensors = [torch.from_numpy(np.ascontiguousarray(
            _ours_hf(t, e)).astype(np.float32)) for t in [trees[0]] + dropped]
        ref = _mergekit(combine, tensors).numpy()
        np.testing.assert_allclose(_ours_hf(ours, e), ref, atol=2e-6,
                                   err_msg=f'dare-{combine} {e.hf_key}')
    # Roughly 1 - p of the entries survive; same seed same result.
    keep = np.asarray(baselines.dare_keep_mask(key, 0, 0, (20000,), p))
    self.assertAlmostEqual(keep.mean(), 1 - p, delta=0.02)
    again = baselines.dare(trees[0], trees[1:], drop=p, seed=seed)
    other = baselines.dare(trees[0], trees[1:], drop=p, seed=4)
    a, b, c = (np.asarray(x['layers']['mlp']['up_proj']['kernel'])
               for x in (again, again, other))
    np.testing.assert_array_equal(a, b)
    self.assertFalse(np.array_equal(a, c))

  def test_linear_interpolation_and_full_copy(self):
    mid = baselines.linear_interpolation(self.params[0], self.params[1], 0.25)
    for e in self.entries[:6]:
      np.testing.assert_allclose(
          _ours_hf(mid, e),
          0.75 * self.torch_sd[0][e.hf_key].numpy() +
          0.25 * self.torch_sd[1][e.hf_key].numpy(), atol=1e-6)
    self.assertIs(baselines.full_copy(self.params[0], self.params[1]),
                  self.params[1])

  def test_budget_matched_masks(self):
    shapes = masks_lib.site_shapes(self.cfg)
    act = masks_lib.empty_mask(shapes)
    act['mlp.up_proj'][0, [1, 5, 9]] = True
    act['self_attn.q_proj'][1, [0]] = True
    for m in (baselines.random_mask(act, seed=1),
              baselines.weight_diff_mask(act, self.params[1], self.params[0])):
      for s in act:
        np.testing.assert_array_equal(m[s].sum(-1), act[s].sum(-1))
    wd = baselines.weight_diff_mask(act, self.params[1], self.params[0])
    k = np.asarray(self.params[1]['layers']['mlp']['up_proj']['kernel'] -
                   self.params[0]['layers']['mlp']['up_proj']['kernel'])
    norms = np.linalg.norm(k[0], axis=0)
    self.assertEqual(set(np.flatnonzero(wd['mlp.up_proj'][0])),
                     set(np.argsort(-norms)[:3]))

  def test_bad_inputs(self):
    with self.assertRaisesRegex(transfer.TransferError, '--drop'):
      baselines.dare(self.params[0], self.params[1:], drop=1.0)
    with self.assertRaisesRegex(ValueError, '--density'):
      baselines.ties(self.params[0], self.params[1:], density=0.0)
    with self.assertRaisesRegex(transfer.TransferError, 'no source'):
      baselines.task_arithmetic(self.params[0], [])


if __name__ == '__main__':
  absltest.main()
