"""Evaluation speed: act-jax perplexity and greedy generation vs transformers.

Same model, same batches, side by side in one run:
  perplexity  act-jax `eval.metrics.perplexity` over --ppl_batches batches
              of B x T tokens (a share of right padding), against
              transformers' forward + float32 log-softmax of the same rows;
              tokens/s counts the scored target tokens.
  generation  act-jax `model.generate.generate_ids` (KV cache, all batches
              dispatched before any is fetched) on --gen_prompts prompts of
              mixed lengths, against transformers `generate` (greedy, left
              padding, KV cache, same batch size); every row makes exactly
              --new_tokens tokens (no stop id), so both do the same work;
              tokens/s counts generated tokens. Also printed: how many rows'
              tokens are identical between the two (float32: all of them,
              unless two logits tie to within rounding).
Compile time is excluded (one warm-up call each); each figure is the best
of --rounds interleaved rounds.

  ACT_JAX_CACHE=/tmp/act_cache python benchmarks/eval_bench.py
(the real SmolLM2-135M-Instruct from $ACT_JAX_CACHE); --model=random for a
random Llama of --hidden/--layers/--vocab.
"""

from __future__ import annotations

import sys
import tempfile

from absl import app
from absl import flags
import jax
import numpy as np
import torch
import transformers

import bench_common
from act_jax.eval import metrics
from act_jax.io import hf
from act_jax.model import generate

_MODEL = flags.DEFINE_enum('model', 'smollm2', ['smollm2', 'random'],
                           'The real SmolLM2-135M or a random Llama.')
_HIDDEN = flags.DEFINE_integer('hidden', 576, 'random: hidden size.')
_LAYERS = flags.DEFINE_integer('layers', 30, 'random: layers.')
_VOCAB = flags.DEFINE_integer('vocab', 49152, 'random: vocabulary.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Rows per batch (both metrics).')
_SEQ = flags.DEFINE_integer('seq', 256, 'Perplexity: tokens per row.')
_PPL_BATCHES = flags.DEFINE_integer('ppl_batches', 4, 'Perplexity batches.')
_GEN_PROMPTS = flags.DEFINE_integer('gen_prompts', 16, 'Generation prompts.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 48, 'Longest prompt.')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 32, 'Tokens per reply.')
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Interleaved rounds; best counts.')
_THREADS = flags.DEFINE_integer('torch_threads', 2, 'torch threads.')


def load_models(dtype: str = 'float32'):
  """(HF dir, torch model, act-jax cfg, params)."""
  if _MODEL.value == 'smollm2':
    from act_jax.cases.smollm2 import weights  # pylint: disable=g-import-not-at-top
    d = weights.smollm2_hf_dir()
  else:
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=_VOCAB.value, hidden_size=_HIDDEN.value,
        intermediate_size=_HIDDEN.value * 8 // 3 // 8 * 8,
        num_hidden_layers=_LAYERS.value,
        num_attention_heads=max(1, _HIDDEN.value // 64),
        num_key_value_heads=max(1, _HIDDEN.value // 192), head_dim=64,
        max_position_embeddings=2048, tie_word_embeddings=True)
    d = tempfile.mkdtemp(prefix='act_eval_bench_')
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(d)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      d, dtype=getattr(torch, dtype)).eval()
  cfg, params = hf.load_hf_params(d, param_dtype=dtype)
  return d, model, cfg.replace(dtype=dtype), params


def ppl_batches(vocab: int, seed: int = 0):
  rng = np.random.RandomState(seed)
  out = []
  for _ in range(_PPL_BATCHES.value):
    b, t = _BATCH.value, _SEQ.value
    lens = rng.randint(t * 3 // 4, t + 1, size=b)
    mask = (np.arange(t)[None] < lens[:, None]).astype(np.int32)
    out.append({'tokens_bt': (rng.randint(4, vocab, (b, t)) * mask).astype(
        np.int32), 'attention_mask_bt': mask, 'loss_mask_bt': mask})
  return out


def torch_perplexity(model, batches) -> float:
  """Token-weighted NLL over the same targets as metrics.perplexity."""
  nll, count = 0.0, 0.0
  with torch.inference_mode():
    for b in batches:
      ids = torch.from_numpy(b['tokens_bt'].astype(np.int64))
      mask = torch.from_numpy(b['attention_mask_bt'])
      logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
      lp = torch.log_softmax(logits.float(), -1).gather(
          -1, ids[:, 1:, None])[..., 0]
      w = (mask[:, 1:] * torch.from_numpy(b['loss_mask_bt'][:, 1:])).float()
      nll -= float((lp * w).sum())
      count += float(w.sum())
  return nll / count


def prompts(vocab: int, seed: int = 1) -> list[list[int]]:
  rng = np.random.RandomState(seed)
  top = _PROMPT_LEN.value
  return [list(rng.randint(4, vocab, rng.randint(max(top // 3, 1), top + 1)))
          for _ in range(_GEN_PROMPTS.value)]


def torch_generate(model, ps, pad_id: int) -> list[list[int]]:
  out = []
  with torch.inference_mode():
    for b0 in range(0, len(ps), _BATCH.value):
      chunk = ps[b0:b0 + _BATCH.value]
      ids, mask = generate.left_pad(chunk, pad_id, multiple=1)
      gen = model.generate(
          input_ids=torch.from_numpy(ids.astype(np.int64)),
          attention_mask=torch.from_numpy(mask.astype(np.int64)),
          max_new_tokens=_NEW_TOKENS.value, min_new_tokens=_NEW_TOKENS.value,
          do_sample=False, pad_token_id=pad_id, eos_token_id=None)
      out += gen[:, ids.shape[1]:].tolist()
  return out


def main(argv):
  del argv
  torch.set_num_threads(_THREADS.value)
  print(bench_common.header('eval_bench', ' '.join(
      ['python benchmarks/eval_bench.py'] + sys.argv[1:])), flush=True)
  d, model, cfg, params = load_models()
  model.generation_config.eos_token_id = None  # every row: new_tokens
  batches = ppl_batches(cfg.vocab_size)
  targets = sum(float((b['attention_mask_bt'][:, 1:] *
                       b['loss_mask_bt'][:, 1:]).sum()) for b in batches)
  ps = prompts(cfg.vocab_size)
  generated = len(ps) * _NEW_TOKENS.value
  pad = 0

  ours = {}

  def ours_ppl():
    ours['ppl'] = metrics.perplexity(params, cfg, batches)['nll']

  def ours_gen():
    ours['gen'] = generate.generate_ids(
        params, cfg, ps, max_new_tokens=_NEW_TOKENS.value,
        batch_size=_BATCH.value, pad_id=pad)

  theirs = {}

  def torch_ppl():
    theirs['ppl'] = torch_perplexity(model, batches)

  def torch_gen():
    theirs['gen'] = torch_generate(model, ps, pad)

  fns = {'ppl ours': ours_ppl, 'ppl torch': torch_ppl, 'gen ours': ours_gen,
         'gen torch': torch_gen}
  for fn in fns.values():  # compile / warm up
    fn()
  times = {k: float('inf') for k in fns}
  for _ in range(_ROUNDS.value):
    for k, fn in fns.items():
      times[k] = min(times[k], bench_common.best_time(fn, 1))
  same = sum(a == b for a, b in zip(ours['gen'], theirs['gen']))
  print(f'\nmodel {d} ({cfg.model_type}, {cfg.num_layers} layers, hidden '
        f'{cfg.hidden_size}), float32; perplexity {_PPL_BATCHES.value} x '
        f'{_BATCH.value} x {_SEQ.value}; generation {len(ps)} prompts of '
        f'<= {_PROMPT_LEN.value} tokens, batch {_BATCH.value}, '
        f'{_NEW_TOKENS.value} new tokens each; best of {_ROUNDS.value}; '
        f'load average at the end {bench_common.load_average()}')
  print('| metric | ours / transformers | ours tok/s | transformers tok/s | '
        'agreement |')
  print('|---|---|---|---|---|')
  print(f'| perplexity | {times["ppl torch"] / times["ppl ours"]:.2f}x | '
        f'{targets / times["ppl ours"]:.0f} | '
        f'{targets / times["ppl torch"]:.0f} | NLL {ours["ppl"]:.5f} vs '
        f'{theirs["ppl"]:.5f} |')
  print(f'| greedy generation | {times["gen torch"] / times["gen ours"]:.2f}x'
        f' | {generated / times["gen ours"]:.0f} | '
        f'{generated / times["gen torch"]:.0f} | {same}/{len(ps)} rows '
        'identical |')


if __name__ == '__main__':
  app.run(main)
