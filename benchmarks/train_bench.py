"""Channel-masked fine-tune step: act-jax vs transformers + PyTorch.

Same random Llama model (built with transformers, converted to act-jax),
same batch, same channel mask (rho random output channels per layer and
output site). Peer: the usual PyTorch way, gradient hooks that multiply each
param's grad by its mask, then `torch.optim.AdamW` (full backward: every
linear weight's gradient is computed, then masked). act-jax: the jitted
`finetune.make_train_step` with `scope=channels`, four ways:
  full state, dense grads   full-shape Adam moments, every weight gradient
                            computed then masked (the reference)
  lean, dense grads         Adam state for the selected slices only
  full state, slice grads   weight gradients only for the selected columns
  lean, slice grads         both (the default of train.lean=True)
Printed: step tokens/s, the ratio to torch, the max |param difference| of
each variant from the reference after the same steps, optimizer-state bytes,
and the GEMM rates of jax and torch measured in the same run; then the
optimizer-state bytes of full vs lean at SmolLM2-135M shapes.

  python benchmarks/train_bench.py --hidden=512 --layers=30 --vocab=49152 \
      --batch=8 --seq=128 --steps=3
"""

from __future__ import annotations

import sys
import tempfile

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import bench_common
from act_jax.act import masks
from act_jax.io import hf
from act_jax.io import hf_names
from act_jax.model import forward
from act_jax.model.config import ModelConfig
from act_jax.train import finetune
from act_jax.train import optim

FLAGS = flags.FLAGS
flags.DEFINE_integer('hidden', 256, 'hidden size D')
flags.DEFINE_integer('layers', 4, 'decoder layers L')
flags.DEFINE_integer('vocab', 2048, 'vocabulary V')
flags.DEFINE_integer('batch', 8, 'sequences per step B')
flags.DEFINE_integer('seq', 128, 'tokens per sequence T')
flags.DEFINE_integer('steps', 5, 'timed steps per round (after warm-up)')
flags.DEFINE_integer('rounds', 2, 'interleaved rounds; the best counts')
flags.DEFINE_float('rho', 0.05, 'fraction of channels per (layer, site)')
flags.DEFINE_integer('torch_threads', 2, 'torch intra-op threads')
flags.DEFINE_integer('gemm_n', 2048, 'size of the GEMM-rate probe')

VARIANTS = (('act-jax full state, dense grads', False, False),
            ('act-jax lean, dense grads', True, False),
            ('act-jax full state, slice grads', False, True),
            ('act-jax lean, slice grads', True, True))


def channel_mask(cfg: ModelConfig, rho: float, seed: int = 0):
  """rho of the output channels of every (layer, output site), at random."""
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


class JaxStep:
  """One act-jax variant: its compiled step and its state."""

  def __init__(self, cfg, params, batch, mask, lean, slice_grads):
    tc = finetune.TrainConfig(num_steps=1000, lr=1e-4, weight_decay=0.0,
                              batch_size=batch['tokens_bt'].shape[0],
                              max_seq_len=batch['tokens_bt'].shape[1],
                              scope='channels', lean=lean)
    self.opt = optim.make_optimizer(tc, params, mask,
                                    slice_grads=slice_grads)
    self.fn = jax.jit(finetune.make_train_step(cfg, self.opt, 1, 'float32'),
                      donate_argnums=(0, 1))
    self.params = jax.tree.map(jnp.array, params)
    self.state = self.opt.tx.init(self.params)
    self.masks = jax.device_put(self.opt.masks)
    self.batch = jax.device_put(batch)
    self.i = 0
    self.first_loss = float(self.run(2))  # compile + warm up

  def run(self, steps):
    loss = None
    for _ in range(steps):
      self.params, self.state, m = self.fn(self.params, self.state,
                                           self.batch, jnp.int32(self.i),
                                           self.masks)
      self.i += 1
      loss = loss if loss is not None else m['loss']
    jax.block_until_ready(self.params)
    return loss


class TorchStep:
  """The peer: gradient hooks that mask each grad, then AdamW."""

  def __init__(self, model, batch, leaf_mask_by_name):
    model.train()
    self.model, self.hooks = model, []
    for name, p in model.named_parameters():
      m = leaf_mask_by_name.get(name)
      if m is None:
        p.requires_grad_(False)
        continue
      mt = torch.from_numpy(np.ascontiguousarray(m)).to(p.dtype)
      self.hooks.append(p.register_hook(lambda g, mt=mt: g * mt))
    self.params = [p for p in model.parameters() if p.requires_grad]
    self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.0)
    self.ids = torch.from_numpy(batch['tokens_bt'].astype(np.int64))
    self.first_loss = self.run(2)

  def run(self, steps):
    first = None
    for _ in range(steps):
      out = self.model(input_ids=self.ids, labels=self.ids)
      out.loss.backward()
      torch.nn.utils.clip_grad_norm_(self.params, 1.0)
      self.opt.step()
      self.opt.zero_grad(set_to_none=True)
      first = first if first is not None else float(out.loss.detach())
    return first

  def state_bytes(self):
    return sum(t.numel() * t.element_size() for s in self.opt.state.values()
               for t in s.values() if torch.is_tensor(t))


def torch_masks(cfg, mask, params):
  """HF param name -> mask in HF layout (None: no trainable entry)."""
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
  """Optimizer-state bytes of full state vs lean for `cfg`'s shapes."""
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


def step_flops(n_params_linear: int, tokens: int) -> float:
  """Matmul FLOPs of a full forward + backward (2 + 4 per param-token)."""
  return 6.0 * n_params_linear * tokens


def main(argv):
  del argv
  print(bench_common.header('train_bench', ' '.join(
      ['python benchmarks/train_bench.py'] + sys.argv[1:])), flush=True)
  torch.set_num_threads(FLAGS.torch_threads)
  peaks = {'jax': bench_common.jax_gemm_gflops('float32', FLAGS.gemm_n),
           'torch': bench_common.torch_gemm_gflops('float32', FLAGS.gemm_n)}
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
        f'{FLAGS.hidden}, {FLAGS.layers} layers, vocab {FLAGS.vocab}; batch '
        f'{FLAGS.batch}x{FLAGS.seq}; rho {FLAGS.rho}; {FLAGS.steps} timed '
        f'steps, best of {FLAGS.rounds} rounds', flush=True)
  runs = {name: JaxStep(cfg, params, batch, mask, lean, sg)
          for name, lean, sg in VARIANTS}
  peer = TorchStep(model, batch, torch_masks(cfg, mask, params))
  times = {name: float('inf') for name in list(runs) + ['torch']}
  for _ in range(FLAGS.rounds):  # interleaved: load hits all alike
    for name, r in runs.items():
      times[name] = min(times[name],
                        bench_common.best_time(lambda r=r: r.run(FLAGS.steps),
                                               1))
    times['torch'] = min(times['torch'], bench_common.best_time(
        lambda: peer.run(FLAGS.steps), 1))
  # Every variant ran the same steps on the same batch from the same start.
  ref = jax.device_get(runs[VARIANTS[0][0]].params)
  linear = sum(int(np.prod(x.shape)) for p, x in
               jax.tree_util.tree_leaves_with_path(params)
               if optim.path_key(p).endswith('kernel'))
  flops = step_flops(linear, FLAGS.batch * FLAGS.seq) * FLAGS.steps
  print(f'\nfirst-step loss: torch {peer.first_loss:.5f}, ' + ', '.join(
      f'{n.split("act-jax ")[1]} {r.first_loss:.5f}' for n, r in runs.items()))
  print(f'load average at the end {bench_common.load_average()}')
  print('\n| implementation | vs torch | tokens/s | full fwd+bwd GFLOP/s '
        '(frac of its GEMM) | max abs diff from reference | opt state MiB |')
  print('|---|---|---|---|---|---|')
  rows = [('torch + grad hooks + AdamW', times['torch'], '-',
           peer.state_bytes(), peaks['torch'])]
  for name, r in runs.items():
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(
        jax.tree.leaves(ref), jax.tree.leaves(jax.device_get(r.params))))
    rows.append((name, times[name], f'{diff:.2e}',
                 optim.opt_state_bytes(r.opt.tx, params), peaks['jax']))
  for name, t, diff, b, peak in rows:
    gf = flops / t / 1e9
    print(f'| {name} | {times["torch"] / t:.2f}x | {ntok / t:.0f} | '
          f'{gf:.0f} ({gf / peak:.2f}) | {diff} | {b / 2**20:.2f} |')
  print(f'\nGEMM rates this run (GFLOP/s): jax float32 {peaks["jax"]:.0f}, '
        f'torch float32 {peaks["torch"]:.0f}. "full fwd+bwd GFLOP/s" counts '
        '6 x linear params x tokens for every row (the work of a dense step), '
        'so a variant that skips frozen weight gradients can exceed the '
        'GEMM rate.')
  memory_line('bench model', cfg, params, FLAGS.rho)
  smol = ModelConfig(model_type='llama', vocab_size=49152, hidden_size=576,
                     intermediate_size=1536, num_layers=30, num_heads=9,
                     num_kv_heads=3, head_dim=64, tie_word_embeddings=True)
  memory_line('SmolLM2-135M shapes', smol, forward.abstract_params(smol),
              FLAGS.rho)


if __name__ == '__main__':
  app.run(main)
