"""The abilities of the SmolLM2 case, measured the same way for every model.

  english_ppl   perplexity on held-out English prose (lower is better)
  conlang_ppl   perplexity on held-out conlang text (the specialist's gain)
  qa_acc        greedy answers to held-out English questions in the model's
                chat template, scored by `qa.answer_matches` (first line of
                the reply contains an accepted answer)

Every model sees identical token batches (built once by `make_eval_sets`)
and the compiled functions (`generate.greedy_generate`, a jitted NLL) take
params as arguments, so another variant of the same architecture does not
recompile.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np

from act_jax import data, generate, losses, templates
from act_jax.model_config import ModelConfig
from act_jax.smollm2 import qa

ABILITIES = ('qa_acc', 'english_ppl', 'conlang_ppl')
HIGHER_IS_BETTER = {'qa_acc': True, 'english_ppl': False,
                    'conlang_ppl': False}


@dataclasses.dataclass
class EvalConfig:
  """The `eval` sub-config."""

  max_seq_len: int = 128  # tokens per perplexity text (longer: truncated)
  batch_size: int = 16  # rows per perplexity batch
  max_new_tokens: int = 12  # greedy tokens per QA answer
  qa_limit: int = 0  # use only the first N eval questions (0 = all)


@dataclasses.dataclass
class EvalSets:
  """Tokenized eval sets (host numpy), shared by every model."""

  english: list[dict[str, np.ndarray]]
  conlang: list[dict[str, np.ndarray]]
  qa_prompts_bt: np.ndarray  # left-padded chat prompts [Q, P]
  qa_mask_bt: np.ndarray  # 1 = real prompt token
  qa_answers: list[list[str]]  # accepted answers per question
  eos_ids: tuple[int, ...]  # a reply ends at the first of these
  pad_id: int  # written after a reply's end


def _text_batches(records, tokenizer, cfg: EvalConfig):
  dc = data.DataConfig(template='text', max_seq_len=cfg.max_seq_len,
                       batch_size=cfg.batch_size, overflow='truncate')
  batches, _ = data.load_batches(dc, tokenizer, records)
  return batches


def chat_prompt(tokenizer, question: str) -> str:
  """The user turn + generation prompt in the tokenizer's chat template
  (templates.DEFAULT_QA_FORMAT up to the response without one)."""
  if not getattr(tokenizer, 'chat_template', None):
    head = templates.DEFAULT_QA_FORMAT.split('{response}', 1)[0]
    return head.format(prompt=question)
  return tokenizer.apply_chat_template(
      [{'role': 'user', 'content': question}], tokenize=False,
      add_generation_prompt=True)


def make_eval_sets(records: dict[str, list[dict[str, Any]]], tokenizer,
                   cfg: EvalConfig) -> EvalSets:
  """Tokenizes english_eval, conlang_eval and qa_eval once for all models."""
  qa_recs = records['qa_eval']
  if cfg.qa_limit:
    qa_recs = qa_recs[:cfg.qa_limit]
  ids = [tokenizer(chat_prompt(tokenizer, r['question']),
                   add_special_tokens=False)['input_ids'] for r in qa_recs]
  width = max(map(len, ids))
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  prompts = np.full((len(ids), width), pad, np.int32)
  mask = np.zeros((len(ids), width), np.int32)
  for i, x in enumerate(ids):
    prompts[i, width - len(x):] = x
    mask[i, width - len(x):] = 1
  eos = {tokenizer.eos_token_id}
  end = tokenizer.convert_tokens_to_ids('<|im_end|>') if (
      '<|im_end|>' in tokenizer.get_vocab()) else None
  if end is not None:
    eos.add(end)
  return EvalSets(
      english=_text_batches(records['english_eval'], tokenizer, cfg),
      conlang=_text_batches(records['conlang_eval'], tokenizer, cfg),
      qa_prompts_bt=prompts, qa_mask_bt=mask,
      qa_answers=[list(r['answers']) for r in qa_recs],
      eos_ids=tuple(sorted(e for e in eos if e is not None)), pad_id=pad)


@functools.partial(jax.jit, static_argnames=('cfg',))
def _nll(params, batch, cfg: ModelConfig):
  return losses.nll_sum(params, batch, cfg)


def perplexity(params, cfg: ModelConfig, batches) -> float:
  """exp(mean next-token NLL) over every real token of `batches`."""
  tot, n = 0.0, 0.0
  for b in batches:
    s, c = _nll(params, losses.as_loss_batch(b), cfg)
    tot, n = tot + float(s), n + float(c)
  return float(np.exp(tot / max(n, 1.0)))


def qa_replies(params, cfg: ModelConfig, sets: EvalSets, tokenizer,
               new_tokens: int) -> list[str]:
  """Decoded greedy replies, cut at the first end-of-turn token."""
  toks = generate.greedy_generate(params, cfg, sets.qa_prompts_bt,
                                 sets.qa_mask_bt, max_new_tokens=new_tokens,
                                 eos_id=sets.eos_ids[0], pad_id=sets.pad_id)
  out = []
  for row in toks.tolist():
    cut = [i for i, t in enumerate(row) if t in sets.eos_ids]
    out.append(tokenizer.decode(row[:cut[0]] if cut else row,
                                skip_special_tokens=True))
  return out


def evaluate_abilities(params, cfg: ModelConfig, sets: EvalSets, tokenizer,
                       eval_cfg: EvalConfig) -> tuple[dict[str, float],
                                                       list[str]]:
  """({ability: value}, QA replies) of one model."""
  replies = qa_replies(params, cfg, sets, tokenizer, eval_cfg.max_new_tokens)
  hits = [qa.answer_matches(r, a) for r, a in zip(replies, sets.qa_answers)]
  return {
      'qa_acc': float(np.mean(hits)),
      'english_ppl': perplexity(params, cfg, sets.english),
      'conlang_ppl': perplexity(params, cfg, sets.conlang),
  }, replies
