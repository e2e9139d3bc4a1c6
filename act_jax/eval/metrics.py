"""Evaluation: perplexity, multiple choice, greedy generation + answer matching.

The one implementation of every metric act-jax reports (the pipeline's
evaluate stage, the toy case's build report, the CLIs). Every metric keeps
its per-item outcomes, so reports can put paired bootstrap intervals on any
difference between two models measured on the same items:
  perplexity(...)   `{'ppl', 'nll', 'tokens', 'items': {'nll', 'tokens'}}`
                    over the rows of held-out batches (one row = one item):
                    token-weighted NLL over the masked targets, perplexity
                    `exp(sum nll / sum tokens)` (as torch's mean loss)
  mc_accuracy(...)  `{'acc', 'n'}` for items `{'prompt', 'choices',
                    'answer'}`: the choice of highest log-likelihood given
                    the prompt, summed (`norm='sum'`) or per token ('mean')
  generation(...)   `{'acc', 'n', 'items': [{prompt, answers, generation,
                    extracted, correct}]}`: greedy generation (KV cache)
                    from token-id prompts, each reply scored by
                    `answer_correct`
Answer matching (`match`), against every accepted answer of an item:
  exact        the normalized reply (case, whitespace, thousands commas,
               numerically equal numbers) equals an answer
  contains     an answer occurs as whole words in the reply's first
               non-empty line, or (`contains_tokens` = N > 0) anywhere in
               the text of its first N tokens (case- and
               punctuation-insensitive)
  regex        `pattern`'s group 1 (else group 0) of the reply, normalized,
               equals an answer
  last_number  the last number in the reply equals an answer's number
  hash         the text after `####` (GSM8K style) equals an answer's
Forwards are jitted with params sharded per logical axes (placed once per
call) and the batch over ('data', 'fsdp'); every batch is dispatched before
any result is fetched, so the host never waits on a batch.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Sequence

import jax
import numpy as np

from act_jax.model import generate
from act_jax.model import forward
from act_jax.model import losses
from act_jax.model import sharding
from act_jax.model.config import ModelConfig

MATCHES = ('exact', 'contains', 'regex', 'last_number', 'hash')


# ---------------------------------------------------------------- jitting


@functools.lru_cache(maxsize=16)
def scoring_program(cfg: ModelConfig, mesh):
  """`(jitted, param_sh, batch_sh)`: the per-row scoring forward every
  metric runs, `jitted(params, batch) -> (sum log-probs [B], counts [B])`
  (batch keys `losses.REQUIRED_KEYS`, global arrays on `batch_sh`). Public
  so a plan can compile it ahead of time (benchmarks/plan_7b.py)."""
  param_sh = sharding.tree_shardings(mesh, forward.logical_axes(cfg),
                                     forward.abstract_params(cfg))
  batch_sh = sharding.named_sharding(mesh, ('batch', 'length'))
  # Per-row scores are tiny: replicated, every process can read them.
  out_sh = (sharding.replicated(mesh),) * 2

  def run(params, batch):
    # Activations constrained on the mesh while tracing, wherever the
    # program is traced from (a call, or `.lower` ahead of time).
    with sharding.activation_sharding(mesh):
      return losses.sequence_logprobs(params, batch, cfg)

  return jax.jit(run, in_shardings=(param_sh, batch_sh),
                 out_shardings=out_sh), param_sh, batch_sh


def sequence_scores(params, cfg: ModelConfig, batches, *, mesh=None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per row of every batch: (sum of target log-probs, target count, real).

  `real` marks rows with any real token (a batch's filler rows are not).
  All batches are dispatched before the results are fetched.
  """
  mesh = mesh or sharding.make_mesh()
  fn, param_sh, batch_sh = scoring_program(cfg, mesh)
  # Placed once: params on another sharding would be copied on every call.
  params = sharding.put(params, param_sh)
  pending, real = [], []
  for batch in batches:
    batch, n, rows = losses.place_rows(batch, mesh, batch_sh)
    real.append(rows)
    pending.append((n, fn(params, batch)))
  if not pending:
    raise ValueError('no eval batches')
  got = jax.device_get([out for _, out in pending])
  lp = np.concatenate([np.asarray(s)[:n] for (n, _), (s, _) in
                       zip(pending, got)])
  cnt = np.concatenate([np.asarray(c)[:n] for (n, _), (_, c) in
                        zip(pending, got)])
  return lp, cnt, np.concatenate(real)


# ------------------------------------------------------------- perplexity


def perplexity(params, cfg: ModelConfig, batches, *, mesh=None
              ) -> dict[str, Any]:
  """Token-weighted perplexity over the masked targets; per-row items."""
  lp, cnt, real = sequence_scores(params, cfg, batches, mesh=mesh)
  nll_items = -lp[real].astype(np.float64)
  tok_items = cnt[real].astype(np.float64)
  count = float(tok_items.sum())
  if count == 0:
    raise ValueError('perplexity: the eval batches have no target tokens')
  nll = float(nll_items.sum()) / count
  return {'nll': nll, 'ppl': float(np.exp(nll)), 'tokens': count,
          'items': {'nll': nll_items.tolist(), 'tokens': tok_items.tolist()}}


# -------------------------------------------------------- multiple choice


def _ids(x, tokenizer, special: bool) -> list[int]:
  if isinstance(x, str):
    if tokenizer is None:
      raise ValueError('text items need a tokenizer')
    return list(tokenizer(x, add_special_tokens=special)['input_ids'])
  return [int(t) for t in x]


def _check_mc(items) -> None:
  for i, it in enumerate(items):
    missing = [k for k in ('prompt', 'choices', 'answer') if k not in it]
    if missing:
      raise ValueError(f'mc item {i}: missing fields {missing}; has '
                       f'{sorted(it)}')
    if not 0 <= int(it['answer']) < len(it['choices']):
      raise ValueError(f'mc item {i}: answer {it["answer"]} is not an index '
                       f'into {len(it["choices"])} choices')


def choice_scores(params, cfg: ModelConfig, items, *, tokenizer=None,
                  batch_size: int = 16, mesh=None
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per item (sum log-prob `[n_choices]`, choice token counts)."""
  _check_mc(items)
  rows, owner = [], []
  for i, it in enumerate(items):
    p = _ids(it['prompt'], tokenizer, True)
    for c in it['choices']:
      cids = _ids(c, tokenizer, False)
      if not cids or not p:
        raise ValueError(f'mc item {i}: empty prompt or choice')
      rows.append((p + cids, len(p)))
      owner.append(i)
  length = -(-max(len(r) for r, _ in rows) // 8) * 8
  batches = []
  for b0 in range(0, len(rows), batch_size):
    chunk = rows[b0:b0 + batch_size]
    batch = {k: np.zeros((len(chunk), length), np.int32) for k in
             losses.REQUIRED_KEYS}
    for r, (ids, plen) in enumerate(chunk):
      batch['tokens_bt'][r, :len(ids)] = ids
      batch['attention_mask_bt'][r, :len(ids)] = 1
      batch['loss_mask_bt'][r, plen:len(ids)] = 1
    batches.append(batch)
  sums, counts, _ = sequence_scores(params, cfg, batches, mesh=mesh)
  owner = np.asarray(owner)
  return [(sums[owner == i], counts[owner == i]) for i in range(len(items))]


def mc_accuracy(params, cfg: ModelConfig, items, *, tokenizer=None,
                norm: str = 'sum', batch_size: int = 16, mesh=None
               ) -> dict[str, float]:
  """`{'acc', 'n'}`: argmax of (length-normalized) choice log-likelihood."""
  if norm not in ('sum', 'mean'):
    raise ValueError(f"mc_norm={norm!r}: expected 'sum' or 'mean'")
  scores = choice_scores(params, cfg, items, tokenizer=tokenizer,
                         batch_size=batch_size, mesh=mesh)
  right = 0
  for it, (s, n) in zip(items, scores):
    score = s if norm == 'sum' else s / np.maximum(n, 1)
    right += int(np.argmax(score) == int(it['answer']))
  return {'acc': right / len(items), 'n': len(items)}


# --------------------------------------------------------- answer matching

_NUMBER = re.compile(r'-?\d[\d,]*(?:\.\d+)?')


def normalize_answer(s: str | None) -> str:
  """Lowercase, collapse whitespace, drop thousands commas and a trailing
  period; numbers in canonical form ('1,000.50' -> '1000.5')."""
  if s is None:
    return ''
  s = ' '.join(str(s).strip().lower().split()).rstrip('.').strip()
  if re.fullmatch(r'-?[\d,]*\.?\d+', s):
    s = s.replace(',', '')
    try:
      f = float(s)
      s = str(int(f)) if f == int(f) else repr(f)
    except ValueError:
      pass
  return s


def _words(text: str) -> str:
  return ' ' + re.sub(r'[^a-z0-9]+', ' ', text.lower()).strip() + ' '


def first_line(text: str) -> str:
  """The reply's first non-empty line ('' if none)."""
  lines = [line for line in text.strip().split('\n') if line.strip()]
  return lines[0] if lines else ''


def extract_answer(text: str, match: str = 'exact',
                   pattern: str = '') -> str | None:
  """The part of a reply that `match` compares (None when nothing matches)."""
  if match == 'exact':
    return text
  if match == 'contains':
    return first_line(text)
  if match == 'last_number':
    found = _NUMBER.findall(text)
    return found[-1] if found else None
  if match == 'hash':
    if '####' not in text:
      return None
    return text.split('####', 1)[1].strip().split('\n')[0]
  if match == 'regex':
    m = re.search(pattern, text)
    if m is None:
      return None
    return m.group(1) if m.groups() else m.group(0)
  raise ValueError(f'match={match!r}: expected one of {", ".join(MATCHES)}')


def _gold(answer: str, match: str) -> str:
  if match == 'hash' and '####' in str(answer):
    return normalize_answer(extract_answer(str(answer), 'hash'))
  if match == 'last_number' and _NUMBER.search(str(answer)):
    return normalize_answer(extract_answer(str(answer), 'last_number'))
  return normalize_answer(answer)


def answer_correct(reply: str, answers: Sequence[str], match: str = 'exact',
                   pattern: str = '', span: str | None = None
                  ) -> tuple[str | None, bool]:
  """(extracted part of `reply`, whether it matches any accepted answer).

  `span` (match=contains only): the part of the reply to search instead of
  its first non-empty line (`generation` passes the text of the first N
  reply tokens).
  """
  if span is not None and match != 'contains':
    raise ValueError(f'a span is only searched by match=contains, not '
                     f'{match!r}')
  got = span if span is not None else extract_answer(reply, match, pattern)
  if got is None:
    return None, False
  if match == 'contains':
    words = _words(got)
    return got, any(_words(a) in words for a in answers if str(a).strip())
  norm = normalize_answer(got)
  return got, any(norm == _gold(a, match) for a in answers)


# -------------------------------------------------------------- generation


def generation(params, cfg: ModelConfig, tokenizer, items, *,
               match: str = 'exact', pattern: str = '',
               contains_tokens: int = 0, max_new_tokens: int = 32,
               batch_size: int = 8, stop_ids: Sequence[int] = (),
               mesh=None) -> dict[str, Any]:
  """Greedy replies to `items` scored by `answer_correct`.

  Args:
    items: `{'prompt_ids': [int], 'answers': [str], 'prompt': str}` per
      item (`prompt` is only logged).
    contains_tokens: match=contains searches the text of the reply's first
      N tokens instead of its first non-empty line (0 = the line).
    stop_ids: a reply ends at the first of these (default the tokenizer's
      EOS).

  Returns:
    `{'acc', 'n', 'items': [{'prompt', 'generation', 'extracted',
    'correct'}]}`.
  """
  if not items:
    raise ValueError('generation: no items')
  if contains_tokens < 0 or (contains_tokens and match != 'contains'):
    raise ValueError(f'contains_tokens={contains_tokens}: a token window '
                     'is only searched by match=contains')
  if mesh is not None:
    b = sharding.batch_axes_size(mesh)
    batch_size = -(-batch_size // b) * b
  stop_ids = tuple(stop_ids) or (
      () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,))
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  gen = generate.generate_ids(params, cfg, [it['prompt_ids'] for it in items],
                              max_new_tokens=max_new_tokens,
                              batch_size=batch_size, stop_ids=stop_ids,
                              pad_id=pad, mesh=mesh)
  out = []
  for it, ids in zip(items, gen):
    text = tokenizer.decode(ids, skip_special_tokens=True)
    span = (tokenizer.decode(ids[:contains_tokens], skip_special_tokens=True)
            if contains_tokens else None)
    got, ok = answer_correct(text, it['answers'], match, pattern, span)
    out.append({'prompt': it.get('prompt', ''),
                'answers': list(it['answers']), 'generation': text,
                'extracted': got, 'correct': bool(ok)})
  acc = float(np.mean([o['correct'] for o in out]))
  return {'acc': acc, 'n': len(out), 'items': out}


# ----------------------------------------------------------------- samples


def samples_file(candidate: str, ability: str) -> str:
  """Where one model's per-item samples of one ability go, relative to its
  job's evaluation folder: `samples/<candidate>/<ability>.jsonl`."""
  return f'samples/{candidate}/{ability}.jsonl'


def sample_rows(items) -> list[dict[str, Any]]:
  """One JSON-able row per eval item, numbered (`doc_id`), as lm-eval's
  `--log_samples` writes them: generation items as they are (prompt,
  answers, generation, extracted, correct), perplexity items as
  `{doc_id, nll, tokens}`."""
  if isinstance(items, dict):
    return [{'doc_id': i, 'nll': float(n), 'tokens': int(t)} for i, (n, t)
            in enumerate(zip(items['nll'], items['tokens']))]
  return [dict(doc_id=i, **it) for i, it in enumerate(items)]
