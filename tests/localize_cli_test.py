"""Planted-signal tests of localization and the localize / transfer CLIs.

Three tiny Llama checkpoints: a base, model A = base with HF rows
{3, 17, 40} of the LAST layer's down_proj changed (so, of all captured sites,
only down_proj output channels 3/17/40 of layer 1 differ: nothing after
them is captured), model B = base with up_proj rows {5, 60} of the last
layer changed (up_proj channels 5/60 differ; downstream the SwiGLU hidden
channels 5/60 and every down_proj channel). Statistics come from one
vmapped, pairwise forward on random tokens, saved with stats_io.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import types

from absl.testing import absltest
import jax
import numpy as np
import torch

from act_jax import localize as localize_cli
from act_jax import transfer as transfer_cli
from act_jax.act import analysis
from act_jax.act import localize
from act_jax.act import masks as masks_lib
from act_jax.act import transfer
from act_jax.io import atomic
from act_jax.io import hf
from act_jax.io import models as models_io
from act_jax.io import params as params_io
from act_jax.io import stats as stats_io
from act_jax.model import capture
from act_jax.model import forward
import testutil

PLANT_A = (3, 17, 40)  # down_proj rows, last layer
PLANT_B = (5, 60)  # up_proj rows, last layer
SITES = capture.OUTPUT_SITES + ('mlp.down_proj.in',)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_stats(out_dir, paths, seed=0):
  """A stats dir (stats_io layout) from one pairwise vmapped forward."""
  loaded = [hf.load_hf_params(p) for p in paths]
  cfg = loaded[0][0]
  stacked = forward.stack_params([p for _, p in loaded])
  tokens = testutil.random_tokens(2, 24, cfg.vocab_size, seed)
  out = jax.jit(lambda p, t: forward.apply_models(
      p, t, cfg, capture=capture.CaptureSpec(SITES, pairwise=True),
      compute_logits=False))(stacked, tokens)
  flat = {'count': np.asarray(out.stats['count'])}
  for s in SITES:
    st = out.stats[s]
    for k in ('sum', 'sum_abs', 'sum_sq'):
      flat[f'{s}/{k}'] = np.asarray(st[k])
    flat[f'{s}/pair_abs_diff'] = np.transpose(
        np.asarray(st['pair_abs_diff']), (0, 2, 1, 3))
  manifest = {'models': [{'path': os.path.abspath(p)} for p in paths],
              'model_config': cfg.to_dict(), 'sites': list(SITES),
              'channels': {s: capture.site_channels(cfg, s) for s in SITES},
              'num_layers': cfg.num_layers, 'pairwise': True}
  return stats_io.save_stats(out_dir, flat, manifest)


def _flags(**kw):
  base = dict(score='mean_abs_diff', select='per_site', top_frac=0.05,
              threshold=0.0, mass=0.8, site_overrides='', sites=None,
              unit='channel', seed=0, baselines=False, compare_stats=None,
              other_masks=[], plots=False, source='1', target='0',
              overwrite=False, follow_symlinks=False)
  base.update(kw)
  return types.SimpleNamespace(**base)


def _tflags(**kw):
  base = dict(hf_out=None, policy='average', alpha=1.0, include=[],
              unit='channel', priority=None, allow_other_models=False,
              overwrite=False, follow_symlinks=False, method='act', max_shard_bytes=2**30,
              interp_t=0.5, ta_lambda=0.5, ties_density=0.2, dare_drop=0.9,
              seed=0)
  base.update(kw)
  return types.SimpleNamespace(**base)


def _run(module, *args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  r = subprocess.run([sys.executable, '-m', module, *args], cwd=REPO,
                     env=env, capture_output=True, text=True, timeout=600)
  if r.returncode:
    raise AssertionError(f'{module} failed:\n{r.stderr[-3000:]}')
  return r


class PlantedTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    t = lambda n: os.path.join(cls.tmp, n)
    model = testutil.make_tiny_hf(t('base'), 'llama', seed=0)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    last = model.config.num_hidden_layers - 1
    g = torch.Generator().manual_seed(7)
    for name, rows, mod in (('a', PLANT_A, 'down_proj'),
                            ('b', PLANT_B, 'up_proj')):
      with torch.no_grad():
        w = model.model.layers[last].mlp.get_submodule(mod).weight
        w[list(rows)] += 0.5 * torch.randn(len(rows), w.shape[1],
                                           generator=g)
      model.save_pretrained(t(name))
      testutil.make_tokenizer(t(name))
      model.load_state_dict(sd)
    cls.paths = [t('base'), t('a'), t('b')]
    cls.stats_dir = make_stats(t('stats'), cls.paths)
    cls.stats_dir2 = make_stats(t('stats2'), cls.paths, seed=1)
    cls.stats = stats_io.load_stats(cls.stats_dir)

  def test_planted_channels_come_first(self):
    for stats_dir in (self.stats_dir, self.stats_dir2):  # any probe text
      st = stats_io.load_stats(stats_dir)
      total = sum(m.size for m in
                  localize.localize(st, 1, 0).scores.values())
      res = localize.localize(st, 'a', 'base', select='global',
                              top_frac=3 / total)
      self.assertEqual(masks_lib.to_channels(
          {s: m for s, m in res.mask.items() if m.any()}),
                       {'mlp.down_proj': {'0': [], '1': list(PLANT_A)}})
      s = res.scores['mlp.down_proj'][1]
      others = np.concatenate([v.ravel() for k, v in res.scores.items()
                               if k != 'mlp.down_proj'] +
                              [np.delete(s, PLANT_A)])
      self.assertGreater(s[list(PLANT_A)].min(), 1e3 * others.max() + 1e-30)
      conc = analysis.concentration(res.scores)
      frac90 = conc['sites']['mlp.down_proj']['per_layer']['0.9'][1]
      self.assertGreater(frac90, 0)
      self.assertLessEqual(frac90, len(PLANT_A) / 64)
    # B: per-site, the up_proj of the last layer.
    res = localize.localize(self.stats, 2, 0, top_frac=2 / 96)
    self.assertEqual(np.flatnonzero(res.mask['mlp.up_proj'][1]).tolist(),
                     list(PLANT_B))
    self.assertEqual(np.flatnonzero(res.mask['mlp.down_proj.in'][1]).tolist(),
                     list(PLANT_B))

  def test_cli_localize_then_transfer_recovers_source(self):
    out_a = os.path.join(self.tmp, 'loc_a')
    _run('act_jax.localize', f'--stats={self.stats_dir}', f'--out={out_a}',
         '--source=a', '--target=base', '--top_frac=0.05', '--baselines',
         f'--compare_stats={self.stats_dir2}')
    for f in ('channels.json', 'summary.json', 'meta.json', 'analysis.json',
              'scores.safetensors', 'concentration_heatmap.png',
              'concentration_curves.png', 'overlap.png',
              'baselines/random/channels.json',
              'baselines/weight_diff/channels.json'):
      self.assertTrue(os.path.isfile(os.path.join(out_a, f)), f)
    mask, meta = masks_lib.load_masks(out_a)
    self.assertEqual(meta['source_path'], self.paths[1])
    self.assertTrue(set(PLANT_A) <=
                    set(np.flatnonzero(mask['mlp.down_proj'][1])))
    wd, _ = masks_lib.load_masks(os.path.join(out_a, 'baselines/weight_diff'))
    for s in mask:
      np.testing.assert_array_equal(wd[s].sum(-1), mask[s].sum(-1))
    self.assertTrue(set(PLANT_A) <= set(np.flatnonzero(wd['mlp.down_proj'][1])))
    # B in-process, then merge A and B into the base through the CLI.
    out_b = os.path.join(self.tmp, 'loc_b')
    localize_cli.run_cli(_flags(stats=self.stats_dir, out=out_b, source='b',
                                target='base'))
    merged = os.path.join(self.tmp, 'merged')
    _run('act_jax.transfer', f'--target={self.paths[0]}',
         f'--source={self.paths[1]},{self.paths[2]}',
         f'--masks={out_a},{out_b}', f'--out={merged}', '--policy=priority')
    _, got = models_io.load_model(merged)
    _, pa = hf.load_hf_params(self.paths[1])
    _, pb = hf.load_hf_params(self.paths[2])
    mlp = lambda p, m: np.asarray(p['layers']['mlp'][m]['kernel'])
    np.testing.assert_array_equal(mlp(got, 'down_proj'), mlp(pa, 'down_proj'))
    np.testing.assert_array_equal(mlp(got, 'up_proj'), mlp(pb, 'up_proj'))
    np.testing.assert_array_equal(mlp(got, 'gate_proj'), mlp(pa, 'gate_proj'))
    meta_out = atomic.read_json(os.path.join(merged, params_io.META))
    rep = meta_out['merge_report']
    # Both masks claim down_proj layer-1 channels; each is reported.
    self.assertGreater(rep['num_conflicts'], 0)
    self.assertEqual(rep['conflicts'][0]['sources'], ['a', 'b'])
    # Single-source transplant in-process: A's mask onto the base is A.
    single = os.path.join(self.tmp, 'single')
    transfer_cli.run_cli(_tflags(target=self.paths[0], source=[self.paths[1]],
                                 masks=[out_a], out=single))
    _, got = models_io.load_model(single)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(pa)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  def test_bad_inputs(self):
    out = os.path.join(self.tmp, 'bad')
    with self.assertRaisesRegex(localize.SelectError, '--top_frac'):
      localize_cli.run_cli(_flags(stats=self.stats_dir, out=out, top_frac=1.5))
    with self.assertRaisesRegex(localize.SelectError, '--top_frac'):
      localize_cli.run_cli(_flags(stats=self.stats_dir, out=out, top_frac=0.0))
    with self.assertRaisesRegex(masks_lib.MaskError, 'known sites:'):
      localize_cli.run_cli(_flags(stats=self.stats_dir, out=out,
                                  sites=['mlp.fc1']))
    with self.assertRaisesRegex(localize.LocalizeError, '--source'):
      localize_cli.run_cli(_flags(stats=self.stats_dir, out=out, source='zzz'))
    # Stats whose manifest describes another architecture than the models.
    bad_stats = os.path.join(self.tmp, 'stats_bad')
    shutil.copytree(self.stats_dir, bad_stats)
    mpath = os.path.join(bad_stats, 'manifest.json')
    with open(mpath) as f:
      man = json.load(f)
    man['model_config']['rms_norm_eps'] = 0.5
    with open(mpath, 'w') as f:
      json.dump(man, f)
    with self.assertRaisesRegex(localize.LocalizeError,
                                'different architecture'):
      localize_cli.run_cli(_flags(stats=bad_stats, out=out, baselines=True))
    self.assertFalse(os.path.exists(out))
    loc = os.path.join(self.tmp, 'loc_bad')
    localize_cli.run_cli(_flags(stats=self.stats_dir, out=loc))
    # Localized with source a: refusing b as source.
    with self.assertRaisesRegex(transfer.TransferError,
                                'localized with source'):
      transfer_cli.run_cli(_tflags(target=self.paths[0],
                                   source=[self.paths[2]], masks=[loc],
                                   out=out))
    # A mask from a different architecture.
    other = os.path.join(self.tmp, 'other_arch')
    testutil.make_tiny_hf(other, 'llama', seed=3, tokenizer=False,
                          intermediate_size=80)
    with self.assertRaisesRegex(transfer.TransferError,
                                'different architecture.*intermediate_size'):
      transfer_cli.run_cli(_tflags(target=other, source=[self.paths[1]],
                                   masks=[loc], out=out))
    # A source whose shapes differ (checked leaf by leaf, named).
    with self.assertRaisesRegex(transfer.TransferError,
                                'different architecture'):
      transfer_cli.run_cli(_tflags(target=self.paths[0], source=[other],
                                   masks=[loc], out=out,
                                   allow_other_models=True))
    self.assertFalse(os.path.exists(out))


if __name__ == '__main__':
  absltest.main()
