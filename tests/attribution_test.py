"""Attribution statistics and activation patching against plain PyTorch.

The reference is a transformers Llama with forward (pre-)hooks: attribution
retains each site's activation gradient of the target's summed next-token
NLL (autograd) and multiplies it by the source-target activation
difference; patching replaces the selected channels of the target's site
activations by the source's inside the hooks.
"""

import os
import tempfile

from absl.testing import absltest
import numpy as np
import torch

import testutil
from act_jax import data
from act_jax.act import collect
from act_jax.act import localize
from act_jax.act import patching
from act_jax.eval import metrics as eval_metrics
from act_jax.io import hf
from act_jax.io import stats as stats_io
from act_jax.model import capture
from act_jax.model import forward
from act_jax.model import sharding

SITES = capture.OUTPUT_SITES + capture.INPUT_SITES
TEXTS = ['The cat sat on the mat.', 'ab', 'Hello, world! 12345', 'x + y = z',
         'Qwen and Llama.', 'one two three four', 'seven', 'two words']


def _hook_sites(model, store, sites, grad=False, replace=None):
  """Registers hooks recording (and optionally replacing channels of) every
  site's activation; returns the handles."""
  handles = []
  for li, layer in enumerate(model.model.layers):
    for site in sites:
      key = (site, li)

      def swap(x, key=key):
        if replace is None or key not in replace:
          return x
        m, src = replace[key]
        x = x.clone()
        x[..., m] = src[..., m]
        return x

      if site.endswith('.in'):
        def pre(_, args, key=key):
          x = swap(args[0], key)
          if grad:
            x.retain_grad()
          store[key] = x
          return (x,) + tuple(args[1:])
        handles.append(layer.get_submodule(site[:-3])
                       .register_forward_pre_hook(pre))
      else:
        def post(_, __, out, key=key):
          out = swap(out, key)
          if grad:
            out.retain_grad()
          store[key] = out
          return out
        handles.append(layer.get_submodule(site).register_forward_hook(post))
  return handles


def _torch_run(model, batch, sites, grad=False, replace=None):
  """(store of site activations, [B] sum of target log-probs) of one
  forward; with `grad`, the summed NLL is backpropagated first."""
  ids = torch.tensor(batch['tokens_bt'].astype(np.int64))
  mask = torch.tensor(batch['attention_mask_bt'].astype(np.int64))
  store = {}
  handles = _hook_sites(model, store, sites, grad, replace)
  with torch.set_grad_enabled(grad):
    logits = model(input_ids=ids, attention_mask=mask).logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(
        -1, ids[:, 1:, None])[..., 0]
    w = torch.tensor(batch['token_mask_bt'][:, 1:] *
                     batch['attention_mask_bt'][:, 1:], dtype=torch.float32)
    seq = (lp * w).sum(-1)
    if grad:
      (-seq.sum()).backward()
  for h in handles:
    h.remove()
  return store, seq.detach().double().numpy()


class AttributionTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    dirs = [os.path.join(cls.tmp, f'm{i}') for i in range(2)]
    # Model 0 is the target, model 1 the source.
    cls.torch_models = [testutil.make_tiny_hf(d, 'llama', seed=i)
                        for i, d in enumerate(dirs)]
    loaded = [hf.load_hf_params(d) for d in dirs]
    cls.cfg = loaded[0][0]
    cls.params = [p for _, p in loaded]
    tok = testutil.make_tokenizer()
    dcfg = data.DataConfig(max_seq_len=24, batch_size=4)
    exs = data.tokenize_records([{'text': t} for t in TEXTS], tok,
                                dcfg).examples
    cls.batches = data.make_batches(exs, 4, 24)
    cls.mesh = sharding.make_mesh((-1, 1, 1))

  def test_attribution_equals_torch_autograd(self):
    spec = capture.CaptureSpec(SITES)
    got = collect.collect_stats(self.params, self.cfg, self.batches, spec,
                                mesh=self.mesh, attribution=True)
    want = {s: np.zeros((self.cfg.num_layers,
                         capture.site_channels(self.cfg, s))) for s in SITES}
    for b in self.batches:
      tgt, _ = _torch_run(self.torch_models[0], b, SITES, grad=True)
      src, _ = _torch_run(self.torch_models[1], b, SITES)
      m = b['token_mask_bt'].astype(np.float64)[..., None]
      for (site, l), h in tgt.items():
        g = h.grad.double().numpy()
        d = src[(site, l)].double().numpy() - h.detach().double().numpy()
        want[site][l] += (m * np.abs(d * g)).sum((0, 1))
    for s in SITES:
      a = got[f'{s}/pair_attribution']
      scale = np.abs(want[s]).max()
      self.assertGreater(scale, 0, s)
      np.testing.assert_allclose(a[0, 1], want[s], rtol=2e-4,
                                 atol=2e-5 * scale, err_msg=s)
      # A model against itself: zero up to float round-off (XLA may compute
      # the gathered and the local activation in different fusions).
      self.assertLess(np.abs(np.diagonal(a, 0, 0, 1)).max(), 1e-5 * scale)
    # The plain statistics of the same step are unchanged by the backward.
    plain = collect.collect_stats(self.params, self.cfg, self.batches, spec,
                                  mesh=self.mesh)
    for k, v in plain.items():
      np.testing.assert_allclose(got[k], v, rtol=1e-5,
                                 atol=1e-5 * np.abs(v).max(), err_msg=k)
    # Artifact and score: target row, source column, per counted token.
    manifest = stats_io.make_manifest(['t', 's'], self.cfg, SITES, {}, got,
                                      attribution=True)
    out = stats_io.save_stats(os.path.join(self.tmp, 'stats'), got, manifest)
    st = stats_io.load_stats(out)
    score = localize.channel_scores(st.arrays, st.count, 1, 0, 'attribution')
    np.testing.assert_allclose(score['mlp.up_proj'],
                               want['mlp.up_proj'] / int(got['count'][0]),
                               rtol=2e-4, atol=1e-7)
    # Models in pairs (one pass each): the same artifact.
    pairs = collect.collect_stats(self.params, self.cfg, self.batches, spec,
                                  mesh=self.mesh, attribution=True,
                                  models_per_pass=2)
    np.testing.assert_allclose(pairs['mlp.up_proj/pair_attribution'],
                               got['mlp.up_proj/pair_attribution'],
                               rtol=1e-5, atol=1e-8)

  def test_attribution_needs_a_pair_and_the_statistic(self):
    with self.assertRaisesRegex(ValueError, 'two or more models'):
      collect.collect_stats(self.params[:1], self.cfg, self.batches,
                            mesh=self.mesh, attribution=True)
    plain = collect.collect_stats(self.params, self.cfg, self.batches[:1],
                                  mesh=self.mesh)
    arrays = {s: {k.split('/')[1]: v for k, v in plain.items()
                  if k.startswith(s + '/')} for s in capture.OUTPUT_SITES}
    with self.assertRaisesRegex(localize.ScoreError, 'attribution'):
      localize.channel_scores(arrays, plain['count'], 1, 0, 'attribution')

  def test_patching_equals_torch_hooks(self):
    rng = np.random.default_rng(0)
    sites = ('self_attn.q_proj', 'self_attn.o_proj.in', 'mlp.gate_proj',
             'mlp.down_proj.in', 'mlp.down_proj')
    mask = {s: rng.random((self.cfg.num_layers,
                           capture.site_channels(self.cfg, s))) < 0.3
            for s in sites}
    stacked = forward.stack_params(self.params)
    hooks = patching.patch_hooks(mask, self.cfg)
    lp, cnt, real = patching.patched_sequence_scores(
        stacked, self.cfg, self.batches, hooks, mesh=self.mesh)
    self.assertTrue(real.all())
    want_t, want_s = [], []
    for b in self.batches:
      src, seq_s = _torch_run(self.torch_models[1], b, sites)
      repl = {k: (torch.tensor(mask[k[0]][k[1]]), v) for k, v in src.items()}
      _, seq_t = _torch_run(self.torch_models[0], b, sites, replace=repl)
      want_t.append(seq_t)
      want_s.append(seq_s)
    np.testing.assert_allclose(lp[0], np.concatenate(want_t), rtol=1e-4)
    np.testing.assert_allclose(lp[1], np.concatenate(want_s), rtol=1e-4)
    # Patching moves the target; no channel gives the target's own scores.
    plain_t, plain_cnt, _ = eval_metrics.sequence_scores(
        self.params[0], self.cfg, self.batches, mesh=self.mesh)
    self.assertGreater(np.abs(lp[0] - plain_t).max(), 1e-3)
    none = {s: np.zeros_like(m) for s, m in mask.items()}
    lp0, _, _ = patching.patched_sequence_scores(
        stacked, self.cfg, self.batches, patching.patch_hooks(none, self.cfg),
        mesh=self.mesh)
    np.testing.assert_allclose(lp0[0], plain_t, rtol=1e-5)
    np.testing.assert_array_equal(cnt, plain_cnt)
    ppl = patching.patched_perplexity(stacked, self.cfg, self.batches, hooks,
                                      mesh=self.mesh)
    self.assertAlmostEqual(ppl[0]['nll'], -lp[0].sum() / cnt.sum(), places=6)
    self.assertLen(ppl[0]['items']['nll'], len(TEXTS))

  def test_patch_mask_shape_is_checked(self):
    with self.assertRaisesRegex(ValueError, 'patch mask mlp.up_proj'):
      patching.patch_hooks({'mlp.up_proj': np.zeros((1, 3), bool)}, self.cfg)


if __name__ == '__main__':
  absltest.main()
