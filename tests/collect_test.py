"""Statistics engine against a PyTorch forward-hook oracle, meshes, errors."""

import json
import os
import tempfile
import types

from absl.testing import absltest
import jax
import numpy as np
import torch

import testutil
from act_jax import collect as collect_cli
from act_jax import data
from act_jax.act import collect
from act_jax.io import hf
from act_jax.io import models as models_io
from act_jax.io import stats as stats_io
from act_jax.model import capture
from act_jax.model import sharding

SITES = capture.OUTPUT_SITES
TEXTS = ['The cat sat on the mat.', 'ab', 'Hello, world! 12345',
         'A longer line of probe text that is truncated at the end ' * 2,
         'x + y = z', 'Qwen and Llama.', 'one', 'two words', 'three more words']


def torch_reference(model, examples, pairs_with=()):
  """Per-site sums from forward hooks, one unpadded forward per text.

  Returns ({site: {stat: [L, C]}}, count, {other_index: {site: [L, C]}}) where
  the last holds sum_t |h_model - h_other| against each model in pairs_with.
  """
  models = [model] + list(pairs_with)
  acts = [dict() for _ in models]  # model -> (site, layer) -> [list of [T,C]]
  handles = []
  for mi, m in enumerate(models):
    for li, layer in enumerate(m.model.layers):
      for site in SITES:
        mod = layer.get_submodule(site)

        def hook(_, __, out, key=(site, li), store=acts[mi]):
          store.setdefault(key, []).append(out[0].detach().double().numpy())

        handles.append(mod.register_forward_hook(hook))
  with torch.no_grad():
    for ex in examples:
      ids = torch.tensor(ex.ids[None].astype(np.int64))
      for m in models:
        m(input_ids=ids)
  for h in handles:
    h.remove()
  num_layers = len(model.model.layers)
  stats, pair = {}, {}
  for site in SITES:
    h = [np.concatenate(acts[0][(site, l)]) for l in range(num_layers)]
    stats[site] = {'sum': np.stack([x.sum(0) for x in h]),
                   'sum_abs': np.stack([np.abs(x).sum(0) for x in h]),
                   'sum_sq': np.stack([(x * x).sum(0) for x in h])}
    for oi in range(1, len(models)):
      g = [np.concatenate(acts[oi][(site, l)]) for l in range(num_layers)]
      pair.setdefault(oi, {})[site] = np.stack(
          [np.abs(a - b).sum(0) for a, b in zip(h, g)])
  count = sum(len(ex.ids) for ex in examples)
  return stats, count, pair


def assert_close(test, got, want, what):
  scale = np.abs(want).max() + 1e-6
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale,
                             err_msg=what)


class CollectTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.dirs = [os.path.join(cls.tmp, f'm{i}') for i in range(3)]
    cls.torch_models = [testutil.make_tiny_hf(d, 'qwen2', seed=i)
                        for i, d in enumerate(cls.dirs)]
    cls.probe = os.path.join(cls.tmp, 'probe.jsonl')
    with open(cls.probe, 'w') as f:
      for t in TEXTS:
        f.write(json.dumps({'text': t}) + '\n')
    cls.tok = models_io.load_tokenizer(cls.dirs[0])
    cls.dcfg = data.DataConfig(path=cls.probe, max_seq_len=48, batch_size=4)
    records = data.load_records(cls.probe)
    cls.tokenized = data.tokenize_records(records, cls.tok, cls.dcfg)
    cls.batches = data.make_batches(cls.tokenized.examples, 4, 48)
    loaded = [hf.load_hf_params(d) for d in cls.dirs]
    cls.cfg = loaded[0][0]
    cls.params = [p for _, p in loaded]
    cls.mesh = sharding.make_mesh((-1, 1, 1))
    cls.single = [collect.collect_stats([p], cls.cfg, cls.batches,
                                        mesh=cls.mesh) for p in cls.params]

  def test_padding_and_truncation_are_real(self):
    self.assertEqual(self.tokenized.num_truncated, 1)
    self.assertLen(self.batches, 3)  # 9 texts -> 3 batches, last padded
    self.assertEqual(self.batches[-1]['attention_mask_bt'][1:].sum(), 0)

  def test_single_model_equals_torch_hooks(self):
    want, count, _ = torch_reference(self.torch_models[0],
                                     self.tokenized.examples)
    got = self.single[0]
    self.assertEqual(int(got['count'][0]), count)
    for site in SITES:
      for stat in capture.STAT_NAMES:
        assert_close(self, got[f'{site}/{stat}'][0], want[site][stat],
                     f'{site}/{stat}')

  def test_k3_vmapped_equals_single_runs_and_pairs_equal_torch(self):
    got = collect.collect_stats(self.params, self.cfg, self.batches,
                                mesh=self.mesh)
    for m in range(3):
      for site in SITES:
        for stat in capture.STAT_NAMES:
          assert_close(self, got[f'{site}/{stat}'][m],
                       self.single[m][f'{site}/{stat}'][0], f'{m} {site}')
    _, _, pair = torch_reference(self.torch_models[0],
                                 self.tokenized.examples,
                                 self.torch_models[1:])
    for site in SITES:
      pad = got[f'{site}/pair_abs_diff']
      self.assertEqual(pad.shape, (3, 3, 2, capture.site_channels(
          self.cfg, site)))
      np.testing.assert_array_equal(np.diagonal(pad, 0, 0, 1), 0)
      for j in (1, 2):
        assert_close(self, pad[0, j], pair[j][site], f'pair 0-{j} {site}')
        assert_close(self, pad[j, 0], pair[j][site], f'pair {j}-0 {site}')
    # Every pair in its own pass, combined: same artifact.
    pairs = collect.collect_stats(self.params, self.cfg, self.batches,
                                  mesh=self.mesh, models_per_pass=2)
    for k, v in got.items():
      assert_close(self, pairs[k], v, f'pairs mode {k}')

  def test_sharded_mesh_equals_one_device(self):
    mesh8 = sharding.make_mesh((2, 2, 2))
    mesh1 = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    # Shard the models axis too (the path for K models that do not fit).
    rules = tuple(r for r in sharding.DEFAULT_RULES if r[0] != 'models') + (
        ('models', 'tensor'),)
    got8 = collect.collect_stats(self.params[:2], self.cfg, self.batches,
                                 mesh=mesh8, rules=rules)
    got1 = collect.collect_stats(self.params[:2], self.cfg, self.batches,
                                 mesh=mesh1)
    for k, v in got1.items():
      assert_close(self, got8[k], v, k)

  def test_artifact_round_trip_and_validation(self):
    flat = self.single[0]
    manifest = {'models': [{'path': self.dirs[0]}], 'sites': list(SITES),
                'channels': {s: capture.site_channels(self.cfg, s)
                             for s in SITES},
                'num_layers': self.cfg.num_layers, 'pairwise': False}
    out = os.path.join(self.tmp, 'stats')
    stats_io.save_stats(out, flat, manifest)
    st = stats_io.load_stats(out)
    site = 'mlp.up_proj'
    n = int(flat['count'][0])
    np.testing.assert_allclose(st.mean(site), flat[f'{site}/sum'] / n,
                               rtol=1e-6)
    var = flat[f'{site}/sum_sq'] / n - (flat[f'{site}/sum'] / n)**2
    np.testing.assert_allclose(st.var(site), var, rtol=1e-4, atol=1e-6)
    with self.assertRaisesRegex(stats_io.StatsError, 'no pairwise'):
      st.pair_mean_abs_diff(site)
    # Misshapen manifest: load names the array and the expected shape.
    with open(os.path.join(out, 'manifest.json')) as f:
      man = json.load(f)
    man['channels'][site] += 1
    with open(os.path.join(out, 'manifest.json'), 'w') as f:
      json.dump(man, f)
    with self.assertRaisesRegex(stats_io.StatsError, 'mlp.up_proj/sum'):
      stats_io.load_stats(out)
    bad = dict(flat)
    del bad['mlp.up_proj/sum']
    with self.assertRaisesRegex(stats_io.StatsError, 'mlp.up_proj/sum'):
      stats_io.save_stats(os.path.join(self.tmp, 'bad'), bad, manifest)
    self.assertFalse(os.path.exists(os.path.join(self.tmp, 'bad')))

  # ---- bad input, caught by the CLI before any weights are read ----------

  def _flags(self, **kw):
    base = dict(models=self.dirs[:2], probe=self.probe,
                out=os.path.join(self.tmp, 'cli_out'), tokenizer=None,
                template='text', text_field='text', prompt_field='question',
                response_field='answer', qa_format=data.DEFAULT_QA_FORMAT,
                split='train', num_probe=0, max_seq_len=48, batch_size=4,
                probe_pack=False, overflow='truncate', count_tokens='all',
                sites=','.join(SITES), mesh_shape=['-1', '1', '1'],
                models_axis=None, models_per_pass=0, dtype='', save_every=0,
                throttle_s=0.0, shuffle_seed=None, overwrite=False,
                restart=False, follow_symlinks=False, attribution=False)
    base.update(kw)
    return types.SimpleNamespace(**base)

  def test_error_empty_probe(self):
    empty = os.path.join(self.tmp, 'empty.jsonl')
    open(empty, 'w').close()
    with self.assertRaisesRegex(data.DataError, 'empty.jsonl.*empty'):
      collect_cli.run_cli(self._flags(probe=empty))

  def test_error_missing_field(self):
    with self.assertRaisesRegex(data.DataError,
                                "probe.jsonl.*'prompt'.*has the fields.*text"):
      collect_cli.run_cli(self._flags(template='qa', prompt_field='prompt'))

  def test_error_overflow(self):
    with self.assertRaisesRegex(data.DataError, 'record 4.*max_seq_len=48'):
      collect_cli.run_cli(self._flags(overflow='error'))

  def test_error_different_architecture(self):
    other = os.path.join(self.tmp, 'wide')
    testutil.make_tiny_hf(other, 'qwen2', intermediate_size=128)
    with self.assertRaisesRegex(models_io.ModelDirError,
                                'm0.* and .*wide.*intermediate_size'):
      collect_cli.run_cli(self._flags(models=[self.dirs[0], other]))

  def test_error_different_tokenizer(self):
    other = os.path.join(self.tmp, 'othertok')
    testutil.make_tiny_hf(other, 'qwen2', tokenizer=False)
    tok = testutil.make_tokenizer()
    tok.add_tokens(['<extra>'])
    tok.save_pretrained(other)
    with self.assertRaisesRegex(models_io.ModelDirError,
                                'tokenizer of .*othertok differs'):
      collect_cli.run_cli(self._flags(models=[self.dirs[0], other]))

  def test_error_different_param_shapes(self):
    p = dict(self.params[1])
    p['norm'] = {'scale': np.ones(self.cfg.hidden_size + 1, np.float32)}
    with self.assertRaisesRegex(models_io.ModelDirError,
                                "a and c differ at param .*'norm'"):
      models_io.check_same_shapes(['a', 'b', 'c'],
                                       [self.params[0], self.params[0], p])


if __name__ == '__main__':
  absltest.main()
