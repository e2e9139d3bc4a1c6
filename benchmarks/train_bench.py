"""Channel-masked fine-tune step: act-jax vs transformers + PyTorch, side by side.

Same random Llama model (built with transformers, converted to act-jax),
same batch, same channel mask (top-rho random channels per layer and output
site). Peer: the usual PyTorch way, gradient hooks that multiply each
param's grad by its mask, then `torch.optim.AdamW`. act-jax: the jitted
`finetune.make_train_step` with `scope=channels` (full-state) and with `lean`.
Prints train-step tokens/s and the ratio, then optimizer-state bytes for
channels full-state vs lean (gathered slices) on this model and, from
shapes only, on a SmolLM2-135M-shaped model.

  python benchmarks/train_bench.py --hidden=256 --layers=4 --batch=8 \
      --seq=128 --steps=5
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from act_jax.model import forward
from act_jax.io import hf
from act_jax.act import masks
from act_jax.train import optim
from act_jax.train import finetune
from act_jax.model.config import ModelConfig

FLAGS = flags.FLAGS
flags.DEFINE_integer('hidden', 256, 'hidden size D')
flags.DEFINE_integer('layers', 4, 'decoder layers L')
flags.DEFINE_integer('vocab', 2048, 'vocabulary V')
flags.DEFINE_integer('batch', 8, 'sequences per step B')
flags.DEFINE_integer('seq', 128, 'tokens per sequence T')
flags.DEFINE_integer('steps', 5, 'timed steps (after 2 warm-up steps)')
flags.DEFINE_float('rho', 0.05, 'fraction of channels per (layer, site)')
flags.DEFINE_integer('torch_threads', 2, 'torch intra-op threads')

def channel_mask(cfg: ModelConfig, rho: float, seed: int = 0):
  rng = np.random.RandomState(seed)
  out = {}
  for site, (layers, chans) in masks.site_shapes(cfg).items():
    if site.endswith('.in'):
      continue
    m = np.zeros((layers, chans), bool)
    k = max(1, int(round(rho * chans)))
    for layer in range(layers):
      m[layer, rng.choice(chans, k, replace=False)] = True
    out[site] = m
  return out


def bench_jax(cfg, params, batch, mask, lean, steps):
  tc = finetune.TrainConfig(num_steps=1000, lr=1e-4, weight_decay=0.0,
                            batch_size=batch['tokens_bt'].shape[0],
                            max_seq_len=batch['tokens_bt'].shape[1],
                            scope='channels', lean=lean)
  opt = optim.make_optimizer(tc, params, mask)
  step = jax.jit(finetune.make_train_step(cfg, opt, 1, 'float32'),
                 donate_argnums=(0, 1))
  params = jax.tree.map(jnp.array, params)
  state = opt.tx.init(params)
  losses = []
  for i in range(steps + 2):
    if i == 2:
      jax.block_until_ready(params)
      t0 = time.perf_counter()
    params, state, m = step(params, state, batch, jnp.int32(i))
    losses.append(m['loss'])
  jax.block_until_ready(params)
  dt = time.perf_counter() - t0
  return dt, float(losses[0]), optim.opt_state_bytes(opt.tx, params)


def bench_torch(model, batch, leaf_mask_by_name, steps):
  model.train()
  hooks = []
  for name, p in model.named_parameters():
    m = leaf_mask_by_name.get(name)
    if m is None:
      p.requires_grad_(False)
      continue
    mt = torch.from_numpy(np.ascontiguousarray(m)).to(p.dtype)
    hooks.append(p.register_hook(lambda g, mt=mt: g * mt))
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
  ids = torch.from_numpy(batch['tokens_bt'].astype(np.int64))
  losses = []
  for i in range(steps + 2):
    if i == 2:
      t0 = time.perf_counter()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(float(out.loss.detach()))
  dt = time.perf_counter() - t0
  state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values()
                    for t in s.values() if torch.is_tensor(t))
  for h in hooks:
    h.remove()
  return dt, losses[0], state_bytes


def torch_masks(cfg, mask, params):
  """HF param name -> mask in HF layout (None: no trainable entry)."""
  from act_jax.io import hf_names  # pylint: disable=g-import-not-at-top
  leaf = masks.leaf_masks(mask, params, full=True)
  out = {}
  for e in hf_names.hf_entries(cfg):
    m = leaf
    for k in e.path:
      m = m[k]
    m = m if e.layer is None else m[e.layer]
    m = m.T if e.transpose else m
    if m.any():
      out[e.hf_key] = m
  return out


def memory_line(label, cfg, params, rho):
  mask = channel_mask(cfg, rho)
  base = dict(num_steps=100, lr=1e-5, warmup_frac=0.03, schedule='cosine',
              weight_decay=0.0, clip_norm=1.0, scope='channels')
  full = optim.make_optimizer(finetune.TrainConfig(**base), params, mask)
  lean = optim.make_optimizer(finetune.TrainConfig(lean=True, **base), params,
                              mask)
  fb = optim.opt_state_bytes(full.tx, params)
  lb = optim.opt_state_bytes(lean.tx, params)
  sel, tot = optim.mask_counts(optim.normalize_mask(mask, params), params)
  print(f'{label}: params {tot / 1e6:.2f}M, trainable {sel / 1e6:.3f}M '
        f'({sel / tot:.2%}); opt state channels full-state {fb / 2**20:.1f} '
        f'MiB, lean {lb / 2**20:.2f} MiB ({fb / max(lb, 1):.1f}x smaller)')


def main(argv):
  del argv
  torch.set_num_threads(FLAGS.torch_threads)
  torch.manual_seed(0)
  hf_cfg = transformers.LlamaConfig(
      vocab_size=FLAGS.vocab, hidden_size=FLAGS.hidden,
      intermediate_size=FLAGS.hidden * 8 // 3 // 8 * 8,
      num_hidden_layers=FLAGS.layers, num_attention_heads=FLAGS.hidden // 64,
      num_key_value_heads=max(1, FLAGS.hidden // 128), head_dim=64,
      max_position_embeddings=max(256, FLAGS.seq), tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(hf_cfg).float()
  tmp = tempfile.mkdtemp()
  model.save_pretrained(tmp)
  cfg, params = hf.load_hf_params(tmp)
  params = jax.device_get(params)
  tokens = np.random.RandomState(0).randint(0, FLAGS.vocab,
                                            (FLAGS.batch, FLAGS.seq))
  ones = np.ones_like(tokens, np.int32)
  batch = {'tokens_bt': tokens.astype(np.int32), 'attention_mask_bt': ones,
           'loss_mask_bt': ones}
  mask = channel_mask(cfg, FLAGS.rho)
  ntok = FLAGS.batch * FLAGS.seq * FLAGS.steps
  print(f'model: {forward.count_params(params) / 1e6:.2f}M params, hidden '
        f'{FLAGS.hidden}, {FLAGS.layers} layers; batch {FLAGS.batch}x'
        f'{FLAGS.seq}; rho {FLAGS.rho}; jax devices {jax.devices()}; '
        f'torch threads {FLAGS.torch_threads}; cpus {os.cpu_count()}; '
        f'load {os.getloadavg()[0]:.1f}')
  jt, jl, jb = bench_jax(cfg, params, batch, mask, False, FLAGS.steps)
  lt, ll, lb = bench_jax(cfg, params, batch, mask, True, FLAGS.steps)
  tt, tl, tb = bench_torch(model, batch, torch_masks(cfg, mask, params),
                           FLAGS.steps)
  print(f'first-step loss: jax {jl:.5f} lean {ll:.5f} torch {tl:.5f}')
  print('| implementation | tokens/s | vs torch | opt state MiB |')
  print('|---|---|---|---|')
  for name, t, b in (('torch + grad hooks + AdamW', tt, tb),
                     ('act-jax channels (full state)', jt, jb),
                     ('act-jax channels lean', lt, lb)):
    print(f'| {name} | {ntok / t:.0f} | {tt / t:.2f}x | {b / 2**20:.2f} |')
  memory_line('bench model', cfg, params, FLAGS.rho)
  smol = ModelConfig(model_type='llama', vocab_size=49152, hidden_size=576,
                     intermediate_size=1536, num_layers=30, num_heads=9,
                     num_kv_heads=3, head_dim=64, tie_word_embeddings=True)
  memory_line('SmolLM2-135M shapes', smol, forward.abstract_params(smol),
              FLAGS.rho)


if __name__ == '__main__':
  app.run(main)
