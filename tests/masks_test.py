"""Tests for act_jax.masks: files, set ops, coupling, param trees."""

import json
import os
import tempfile

from absl.testing import absltest
import numpy as np

from act_jax.model import forward
from act_jax.act import masks
from act_jax.model.config import ModelConfig

CFG = ModelConfig(model_type='llama', vocab_size=20, hidden_size=16,
                  intermediate_size=24, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=4, mlp_bias=True)


class MasksTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.shapes = masks.site_shapes(CFG)
    self.m = masks.empty_mask(self.shapes)
    self.m['mlp.up_proj'][1, [2, 7]] = True
    self.m['self_attn.q_proj'][0, [5]] = True

  def test_save_load_roundtrip_and_json_layout(self):
    d = os.path.join(tempfile.mkdtemp(), 'mask')
    masks.save_masks(d, self.m, {'score': 'mean_abs_diff'})
    with self.assertRaisesRegex(FileExistsError, 'already exists'):
      masks.save_masks(d, self.m, {'score': 'x'})
    masks.save_masks(d, self.m, {'score': 'x'}, overwrite=True)  # atomic
    self.assertEqual(sorted(os.listdir(os.path.dirname(d))), ['mask'])
    with open(os.path.join(d, 'channels.json')) as f:
      ch = json.load(f)
    self.assertEqual(ch['mlp.up_proj'], {'0': [], '1': [2, 7]})
    with open(os.path.join(d, 'summary.json')) as f:
      summ = json.load(f)
    self.assertEqual(summ['sites']['mlp.up_proj']['count_per_layer'], [0, 2])
    self.assertEqual(summ['count'], 3)
    got, meta = masks.load_masks(d)
    self.assertEqual(meta['score'], 'x')
    for s in self.m:
      np.testing.assert_array_equal(got[s], self.m[s])
    ch['mlp.up_proj']['1'] = [99]
    with open(os.path.join(d, 'channels.json'), 'w') as f:
      json.dump(ch, f)
    with self.assertRaisesRegex(masks.MaskError, r'channels outside \[0, 24\)'):
      masks.load_masks(d)
    with self.assertRaisesRegex(masks.MaskError, 'not a mask directory'):
      masks.load_masks(os.path.dirname(d))

  def test_set_ops(self):
    b = masks.empty_mask(self.shapes)
    b['mlp.up_proj'][1, [7, 9]] = True
    self.assertEqual(masks.count(masks.union(self.m, b)), 4)
    self.assertEqual(masks.to_channels(masks.intersection(self.m, b))
                     ['mlp.up_proj']['1'], [7])
    self.assertEqual(masks.to_channels(masks.difference(self.m, b))
                     ['mlp.up_proj']['1'], [2])
    only = {'mlp.up_proj': b['mlp.up_proj']}
    self.assertEqual(masks.count(masks.union(only, self.m)), 4)

  def test_couple_neuron_and_head(self):
    m = masks.empty_mask(self.shapes)
    m['mlp.gate_proj'][0, 3] = True
    m['mlp.down_proj.in'][1, 5] = True
    n = masks.couple(m, CFG, 'neuron')
    for s in ('mlp.gate_proj', 'mlp.up_proj', 'mlp.down_proj.in'):
      self.assertEqual(masks.to_channels(n)[s], {'0': [3], '1': [5]})
    m = masks.empty_mask(self.shapes)
    m['self_attn.q_proj'][0, 13] = True  # head 3 -> kv head 1 (G = 2)
    m['self_attn.v_proj'][1, 1] = True  # kv head 0 only
    h = masks.couple(m, CFG, 'head')
    ch = masks.to_channels(h)
    self.assertEqual(ch['self_attn.q_proj']['0'], [12, 13, 14, 15])
    self.assertEqual(ch['self_attn.o_proj.in']['0'], [12, 13, 14, 15])
    self.assertEqual(ch['self_attn.k_proj']['0'], [4, 5, 6, 7])
    self.assertEqual(ch['self_attn.v_proj']['1'], [0, 1, 2, 3])
    self.assertEqual(ch['self_attn.q_proj']['1'], [])
    with self.assertRaisesRegex(masks.MaskError, '--unit'):
      masks.couple(m, CFG, 'block')

  def test_hf_tensor_masks_agree_with_the_param_tree_masks(self):
    m = masks.couple(self.m, CFG, 'neuron')  # adds down_proj.in rows
    got = masks.hf_tensor_masks(m, CFG)
    self.assertEqual(got['model.layers.1.mlp.up_proj.weight'],
                     {'rows': [2, 7]})
    self.assertEqual(got['model.layers.1.mlp.up_proj.bias'], {'rows': [2, 7]})
    self.assertEqual(got['model.layers.1.mlp.down_proj.weight'],
                     {'cols': [2, 7]})
    self.assertNotIn('model.layers.0.mlp.up_proj.weight', got)
    self.assertNotIn('model.layers.0.self_attn.q_proj.bias', got)  # none
    # Entry for entry, the same selection as the (transposed) leaf masks.
    tree = masks.leaf_masks(m, forward.abstract_params(CFG), full=True)
    for layer in range(CFG.num_layers):
      for mod in ('mlp.up_proj', 'mlp.down_proj', 'self_attn.q_proj'):
        leaf = tree['layers']
        for k in mod.split('.'):
          leaf = leaf[k]
        want = np.asarray(leaf['kernel'][layer]).T  # HF [d_out, d_in]
        sel = got.get(f'model.layers.{layer}.{mod}.weight', {})
        hf = np.zeros_like(want)
        hf[sel.get('rows', []), :] = True
        hf[:, sel.get('cols', [])] = True
        np.testing.assert_array_equal(hf, want, err_msg=f'{layer} {mod}')

  def test_leaf_masks_full_and_compact_agree(self):
    m = dict(self.m)
    m['mlp.down_proj'] = np.zeros((2, 16), bool)
    m['mlp.down_proj'][0, 1] = True
    m['mlp.down_proj.in'] = np.zeros((2, 24), bool)
    m['mlp.down_proj.in'][0, 4] = True
    abstract = forward.abstract_params(CFG)
    full = masks.leaf_masks(m, abstract, full=True)
    compact = masks.leaf_masks(m, abstract, include=('norm.scale',))
    down = full['layers']['mlp']['down_proj']
    want = np.zeros((2, 24, 16), bool)
    want[0, :, 1] = True
    want[0, 4, :] = True
    np.testing.assert_array_equal(down['kernel'], want)
    np.testing.assert_array_equal(down['bias'][0], np.eye(16, dtype=bool)[1])
    up = full['layers']['mlp']['up_proj']
    self.assertEqual(up['kernel'].sum(), 2 * 16)
    self.assertEqual(np.flatnonzero(up['bias'][1]).tolist(), [2, 7])
    self.assertFalse(full['embed_tokens']['embedding'].any())
    self.assertFalse(full['norm']['scale'].any())
    self.assertTrue(compact['norm']['scale'].all())
    self.assertEqual(compact['layers']['mlp']['up_proj']['kernel'].shape,
                     (2, 1, 24))
    for path in (('layers', 'mlp', 'up_proj', 'kernel'),
                 ('layers', 'self_attn', 'q_proj', 'kernel')):
      c, f = compact, full
      for p in path:
        c, f = c[p], f[p]
      np.testing.assert_array_equal(np.broadcast_to(c, f.shape), f)
    with self.assertRaisesRegex(masks.MaskError, 'does not match'):
      masks.leaf_masks({'mlp.up_proj': np.ones((2, 5), bool)}, abstract)


if __name__ == '__main__':
  absltest.main()
