"""Scoring the toy abilities: greedy exact match and answer perplexity.

Exact match: prompts are left-padded into a fixed buffer `[B, P + N]`; a
jitted `fori_loop` re-runs the (short) forward N times and writes the greedy
token at each step, so one compile serves every model of the same config.
Perplexity: `exp` of the mean NLL of answer tokens and EOS.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from act_jax import forward
from act_jax.model_config import ModelConfig
from act_jax.toy import abilities, batches, tokenizer


@functools.partial(jax.jit, static_argnames=('prompt_len', 'cfg', 'num_new'))
def _greedy(params, buf_bt, mask_bt, prompt_len, cfg: ModelConfig,
            num_new: int):

  def body(k, carry):
    buf, mask = carry
    logits = forward.apply(params, buf, cfg, attention_mask_bt=mask).logits
    nxt = jnp.argmax(logits[:, prompt_len + k - 1], axis=-1).astype(buf.dtype)
    buf = buf.at[:, prompt_len + k].set(nxt)
    mask = mask.at[:, prompt_len + k].set(1)
    return buf, mask

  buf, _ = jax.lax.fori_loop(0, num_new, body, (buf_bt, mask_bt))
  return buf[:, prompt_len:]


def greedy_answers(params, cfg: ModelConfig, prompts: list[str],
                   num_new: int, batch_size: int = 256) -> list[str]:
  """Greedy continuations (up to EOS) of each prompt."""
  enc = [[tokenizer.BOS_ID] + tokenizer.encode(p) for p in prompts]
  plen = max(len(e) for e in enc)
  out = []
  for s in range(0, len(enc), batch_size):
    chunk = enc[s:s + batch_size]
    b = len(chunk)
    buf = np.zeros((batch_size, plen + num_new), np.int32)
    mask = np.zeros_like(buf)
    for i, e in enumerate(chunk):
      buf[i, plen - len(e):plen] = e
      mask[i, plen - len(e):plen] = 1
    gen = np.asarray(_greedy(params, buf, mask, plen, cfg, num_new))
    out += [tokenizer.decode(g) for g in gen[:b]]
  return out


def exact_match(params, cfg: ModelConfig, records: list[dict],
                num_new: int) -> float:
  """Fraction of records whose greedy answer equals `answer` exactly."""
  got = greedy_answers(params, cfg, [r['prompt'] for r in records],
                       num_new + 1)
  return float(np.mean([g == r['answer'] for g, r in zip(got, records)]))


@functools.partial(jax.jit, static_argnames=('cfg',))
def _nll_sums(params, batch, cfg: ModelConfig):
  out = forward.apply(params, batch['tokens_bt'], cfg,
                      attention_mask_bt=batch['attention_mask_bt'])
  nll = optax.softmax_cross_entropy_with_integer_labels(
      out.logits[:, :-1].astype(jnp.float32), batch['tokens_bt'][:, 1:])
  mask = batch['loss_mask_bt'][:, 1:]
  return jnp.sum(nll * mask), jnp.sum(mask)


def perplexity(params, cfg: ModelConfig, records: list[dict], seq_len: int,
               batch_size: int = 256) -> float:
  """exp(mean NLL) over answer tokens (+ EOS) of `records`."""
  arrays = batches.encode_records(records, seq_len, scope='answer')
  total, count = 0.0, 0.0
  n = len(records)
  for s in range(0, n, batch_size):
    chunk = {k: v[s:s + batch_size] for k, v in arrays.items()}
    pad = batch_size - len(chunk['tokens_bt'])
    if pad:  # keep one compiled shape; padded rows have an empty loss mask
      chunk = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
               for k, v in chunk.items()}
    t, c = _nll_sums(params, chunk, cfg)
    total += float(t)
    count += float(c)
  return float(np.exp(total / max(count, 1.0)))


def score(params, cfg: ModelConfig, ability: str, records: list[dict],
          seq_len: int) -> dict[str, float]:
  """`{metric_name: value}` for one ability (see abilities.ABILITIES)."""
  a = abilities.get(ability)
  if a.metric == 'exact_match':
    return {'exact_match': exact_match(params, cfg, records,
                                       a.max_answer_chars)}
  return {'perplexity': perplexity(params, cfg, records, seq_len)}
