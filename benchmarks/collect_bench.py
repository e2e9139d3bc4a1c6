"""Statistics throughput: act-jax collect vs transformers + PyTorch hooks.

Side by side in one process, on the same random tokens (one document per
row, a share of right padding so masking matters), both accumulating the
same per-channel statistics of the 7 linear outputs of every layer: sum h,
sum |h|, sum h^2 (float32), and for K=2 the token-aligned sum |h_0 - h_1|.
Ours is the exact jitted step `collect_stats` runs (segment ids included).
Also timed, to show where the time goes: our plain forward of the same K
models (no capture, without and with segment ids) and torch's bare forward.
Printed: the ratio ours / hooks, what capture and segment ids cost over the
plain forward, the time of K=2 over K=1, our GFLOP/s (padded tokens,
matmuls only) as a fraction of the `jnp.dot` rate of the same run, and
tokens/s (real tokens). Compile time is excluded (one warm-up step each);
each figure is the best of --rounds interleaved rounds.

Default model: a random Qwen2 of about 200M params (hidden 1024, 12 layers,
16 heads, 4 KV heads, head_dim 64, intermediate 2816, vocab 32000, untied).
  python benchmarks/collect_bench.py --batch=4 --seq=256 --steps=3
  python benchmarks/collect_bench.py --batch=16 --seq=512 --steps=2 \
      --dtypes=float32
Add --smollm2 to also run the real SmolLM2-135M (built once into
$ACT_JAX_CACHE by act_jax/cases/smollm2/weights.py).
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import bench_common
from act_jax.model import capture
from act_jax.act import collect
from act_jax.model import forward
from act_jax.io import hf_names
from act_jax.model import sharding
from act_jax.model.config import from_hf_config

_HIDDEN = flags.DEFINE_integer('hidden', 1024, 'Hidden size.')
_LAYERS = flags.DEFINE_integer('layers', 12, 'Layers.')
_HEADS = flags.DEFINE_integer('heads', 16, 'Attention heads (head_dim 64).')
_KV = flags.DEFINE_integer('kv_heads', 4, 'KV heads.')
_FF = flags.DEFINE_integer('intermediate', 2816, 'MLP size.')
_VOCAB = flags.DEFINE_integer('vocab', 32000, 'Vocabulary.')
_BATCH = flags.DEFINE_integer('batch', 4, 'Rows per batch.')
_SEQ = flags.DEFINE_integer('seq', 256, 'Tokens per row.')
_STEPS = flags.DEFINE_integer('steps', 2, 'Timed batches per measurement.')
_DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Dtypes.')
_KS = flags.DEFINE_list('ks', ['1', '2'], 'Numbers of models.')
_SMOLLM2 = flags.DEFINE_bool('smollm2', False, 'Also bench SmolLM2-135M.')
_ROUNDS = flags.DEFINE_integer('rounds', 2,
                               'Interleaved rounds; the best counts.')
_GEMM_N = flags.DEFINE_integer('gemm_n', 2048, 'Size of the GEMM-rate probe.')

LINEARS = capture.OUTPUT_SITES


def to_params(sd: dict[str, torch.Tensor], cfg) -> dict:
  """Torch state dict -> act-jax params (same table as hf_convert)."""
  params = jax.tree.map(lambda x: np.zeros(x.shape, np.float32),
                        forward.abstract_params(cfg.replace(
                            param_dtype='float32')))
  for key, e in hf_names.hf_key_table(cfg).items():
    if key not in sd:
      continue
    t = sd[key].float().numpy()
    t = t.T if e.transpose else t
    leaf = params
    for p in e.path[:-1]:
      leaf = leaf[p]
    if e.layer is None:
      leaf[e.path[-1]][...] = t
    else:
      leaf[e.path[-1]][e.layer] = t
  return params


def batches(n, b, t, vocab, seed=0):
  """Random probe batches as data.py builds them: one document per row,
  right padding (lengths T/2..T), so masking matters."""
  rng = np.random.RandomState(seed)
  out = []
  for _ in range(n):
    lens = rng.randint(t // 2, t + 1, size=b)
    mask = (np.arange(t)[None] < lens[:, None]).astype(np.int32)
    out.append({'tokens_bt': (rng.randint(4, vocab, (b, t)) * mask).astype(
        np.int32), 'attention_mask_bt': mask, 'token_mask_bt': mask,
                'positions_bt': np.maximum(np.cumsum(mask, 1) - 1, 0).astype(
                    np.int32), 'segment_ids_bt': mask.copy()})
  return out


class HookStats:
  """Forward hooks accumulating the statistics in float32 (the peer)."""

  def __init__(self, models):
    self.models, self.handles, self.mask = models, [], None
    self.acc, self.cache = {}, {}
    for mi, m in enumerate(models):
      for li, layer in enumerate(m.model.layers):
        for site in LINEARS:
          self.handles.append(layer.get_submodule(site).register_forward_hook(
              self._hook(mi, li, site)))

  def remove(self):
    for h in self.handles:
      h.remove()

  def _hook(self, mi, li, site):
    def fn(_, __, out):
      h = out.float() * self.mask
      key = (mi, li, site)
      for name, v in (('sum', h), ('abs', h.abs()), ('sq', h * h)):
        s = v.sum((0, 1))
        self.acc[(key, name)] = self.acc.get((key, name), 0) + s
      if len(self.models) == 2:
        if mi == 0:
          self.cache[(li, site)] = h
        else:
          d = (h - self.cache.pop((li, site))).abs().sum((0, 1))
          self.acc[(key, 'pair')] = self.acc.get((key, 'pair'), 0) + d
    return fn

  @torch.inference_mode()
  def run(self, batch):
    mask = torch.from_numpy(batch['attention_mask_bt'])
    self.mask = mask[..., None].float()
    ids = torch.from_numpy(batch['tokens_bt'].astype(np.int64))
    for m in self.models:
      m.model(input_ids=ids, attention_mask=mask)  # no lm_head, like ours


def fwd_flops(cfg, tokens, seq):
  """Matmul FLOPs of a forward without lm_head (full-square attention)."""
  per_layer = 2 * cfg.hidden_size * (2 * cfg.q_dim + 2 * cfg.kv_dim) + (
      6 * cfg.hidden_size * cfg.intermediate_size)
  attn = 4 * seq * cfg.q_dim  # QK^T and PV per token, full square
  return tokens * cfg.num_layers * (per_layer + attn)


def _plain_step(cfg, mesh, psh, bsh, segments):
  """Our forward of the stacked models without capture (same layout)."""
  def run(params, batch):
    with sharding.activation_sharding(mesh):
      out = forward.apply_models(
          params, batch['tokens_bt'], cfg, layer_major=True,
          attention_mask_bt=batch['attention_mask_bt'],
          positions_bt=batch['positions_bt'],
          segment_ids_bt=batch['segment_ids_bt'] if segments else None,
          compute_logits=False)
    return jnp.sum(out.logits[..., 0])
  keys = collect._KEYS  # pylint: disable=protected-access
  return jax.jit(run, in_shardings=(psh, {k: bsh for k in keys}))


def bench_model(name, torch_models, cfg32, dtypes, ks):
  """Rows `{name, dtype, k, ours, hooks, plain, plain_seg, torch_fwd}` of
  seconds per timed pass over the batches."""
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  data = batches(_STEPS.value + 1, _BATCH.value, _SEQ.value, cfg32.vocab_size)
  real = sum(int(b['attention_mask_bt'].sum()) for b in data[1:])
  params32 = [to_params(m.state_dict(), cfg32) for m in torch_models]
  rows = []
  for dt in dtypes:
    cfg = cfg32.replace(dtype=dt, param_dtype=dt)
    for k in ks:
      # Ours: the exact jitted step collect_stats uses.
      spec = capture.CaptureSpec(LINEARS, pairwise=k >= 2)
      stacked = forward.stack_params(
          [jax.tree.map(lambda x: jnp.asarray(x, dt), p)
           for p in params32[:k]], layer_major=True)
      step, zeros, psh, bsh, _, _ = collect.compiled_step(
          cfg, spec, mesh, sharding.DEFAULT_RULES, k,
          (_BATCH.value, _SEQ.value))
      stacked = jax.device_put(stacked, psh)
      dev = [jax.device_put(b, bsh) for b in data]
      acc = [step(zeros(), stacked, dev[0])]
      jax.block_until_ready(acc)

      def ours():
        for b in dev[1:]:
          acc[0] = step(acc[0], stacked, b)
        jax.block_until_ready(acc)

      plains = {}
      for segments in (False, True):
        fn = _plain_step(cfg, mesh, psh, bsh, segments)
        jax.block_until_ready(fn(stacked, dev[0]))
        plains[segments] = (lambda fn=fn: jax.block_until_ready(
            [fn(stacked, b) for b in dev[1:]]))
      # Peer: transformers + forward hooks, and its bare forward (K=1).
      tdt = torch.float32 if dt == 'float32' else torch.bfloat16
      tms = [m.to(tdt) for m in torch_models[:k]]
      hooks = HookStats(tms)
      hooks.run(data[0])

      def theirs():
        for b in data[1:]:
          hooks.run(b)

      def torch_fwd():
        with torch.inference_mode():
          for b in data[1:]:
            ids = torch.from_numpy(b['tokens_bt'].astype(np.int64))
            mask = torch.from_numpy(b['attention_mask_bt'])
            for m in tms:
              m.model(input_ids=ids, attention_mask=mask)

      times = {key: float('inf') for key in
               ('ours', 'hooks', 'plain', 'plain_seg', 'torch_fwd')}
      for _ in range(_ROUNDS.value):  # interleaved: load hits all alike
        for key, fn in (('ours', ours), ('plain', plains[False]),
                        ('plain_seg', plains[True]), ('hooks', theirs)):
          times[key] = min(times[key], bench_common.best_time(fn, 1))
        if k == 1:
          hooks.remove()
          times['torch_fwd'] = min(times['torch_fwd'],
                                   bench_common.best_time(torch_fwd, 1))
          hooks = HookStats(tms)
      hooks.remove()
      for m in torch_models:
        m.float()
      rows.append(dict(name=name, dtype=dt, k=k, real=real, cfg=cfg,
                       **times))
  return rows


def print_tables(rows, peaks):
  """The benchmark's table, ratios first."""
  padded = _STEPS.value * _BATCH.value * _SEQ.value
  print('\n| model | dtype | K | ours / hooks | capture cost | segment-id '
        'cost | K=2 / K=1 time | ours GFLOP/s (frac of dot) | ours tok/s | '
        'hooks tok/s | torch fwd tok/s |')
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  by = {(r['name'], r['dtype'], r['k']): r for r in rows}
  for r in rows:
    one = by.get((r['name'], r['dtype'], 1))
    k_ratio = (f"{r['ours'] / one['ours']:.2f}x"
               if one is not None and r['k'] == 2 else '-')
    gf = fwd_flops(r['cfg'], padded, _SEQ.value) * r['k'] / r['ours'] / 1e9
    peak = peaks['jax', r['dtype']]
    tfwd = (f"{r['real'] / r['torch_fwd']:.0f}"
            if np.isfinite(r['torch_fwd']) else '-')
    print(f"| {r['name']} | {r['dtype']} | {r['k']} | "
          f"{r['hooks'] / r['ours']:.2f}x | "
          f"{r['ours'] / r['plain_seg'] - 1:+.1%} | "
          f"{r['plain_seg'] / r['plain'] - 1:+.1%} | {k_ratio} | "
          f"{gf:.0f} ({gf / peak:.2f}) | {r['real'] / r['ours']:.0f} | "
          f"{r['real'] / r['hooks']:.0f} | {tfwd} |")
  print('\ncapture cost: the collect step over our plain forward with '
        'segment ids; segment-id cost: plain forward with over without '
        'them; frac of dot: of the jnp.dot rate of the same dtype below.')
  print('GEMM rates this run (GFLOP/s): ' + ', '.join(
      f'{lib} {dt} {v:.0f}' for (lib, dt), v in sorted(peaks.items())))


def main(argv):
  del argv
  print(bench_common.header('collect_bench', ' '.join(
      ['python benchmarks/collect_bench.py'] + sys.argv[1:])), flush=True)
  torch.manual_seed(0)
  peaks = {}
  for dt in sorted(set(_DTYPES.value)):
    peaks['jax', dt] = bench_common.jax_gemm_gflops(dt, _GEMM_N.value)
    peaks['torch', dt] = bench_common.torch_gemm_gflops(dt, _GEMM_N.value)
  hf = transformers.Qwen2Config(
      vocab_size=_VOCAB.value, hidden_size=_HIDDEN.value,
      intermediate_size=_FF.value, num_hidden_layers=_LAYERS.value,
      num_attention_heads=_HEADS.value, num_key_value_heads=_KV.value,
      head_dim=_HIDDEN.value // _HEADS.value, tie_word_embeddings=False,
      max_position_embeddings=max(_SEQ.value, 512))
  models = []
  for seed in range(max(int(k) for k in _KS.value)):
    torch.manual_seed(seed)
    models.append(transformers.Qwen2ForCausalLM(hf).eval())
  cfg = from_hf_config(hf.to_dict())
  n_params = sum(p.numel() for p in models[0].parameters())
  ks = [int(k) for k in _KS.value]
  rows = bench_model(f'qwen2-{n_params / 1e6:.0f}M', models, cfg,
                     _DTYPES.value, ks)
  if _SMOLLM2.value:
    from act_jax.cases.smollm2 import weights  # pylint: disable=g-import-not-at-top
    d = weights.smollm2_hf_dir()
    sm = [transformers.AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.float32).eval()]
    sm_cfg = from_hf_config(sm[0].config.to_dict())
    if 2 in ks:  # a related second model: perturbed copy
      sm.append(transformers.AutoModelForCausalLM.from_pretrained(
          d, dtype=torch.float32).eval())
      with torch.no_grad():
        for p in sm[1].parameters():
          p.add_(torch.randn_like(p) * 1e-3)
    rows += bench_model('smollm2-135M', sm, sm_cfg, _DTYPES.value, ks)
  print(f'\nbatch {_BATCH.value} x {_SEQ.value} tokens, {_STEPS.value} timed '
        f'batches, best of {_ROUNDS.value} rounds; tokens/s counts real '
        f'tokens only; load average at the end {bench_common.load_average()}')
  print_tables(rows, peaks)


if __name__ == '__main__':
  app.run(main)
