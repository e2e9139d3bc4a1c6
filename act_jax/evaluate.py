"""Built-in evaluation: perplexity, multiple choice, generation exact match.

Per ability an `EvalSet` may hold any of:
  ppl  held-out batches (`tokens_bt`, `attention_mask_bt`, `loss_mask_bt` or
       data.py's `token_mask_bt`): token-weighted NLL and perplexity over the
       masked targets (`exp(sum nll / tokens)`, as torch's mean loss);
  mc   items `{'prompt', 'choices', 'answer'}` (text or token-id lists;
       `answer` the index of the right choice): accuracy of the choice with
       the highest log-likelihood given the prompt, summed (`mc_norm='sum'`)
       or per token (`'mean'`), all choices scored in batched forwards;
  gen  items `{'prompt', 'answer'}`: greedy generation (KV cache) then exact
       match after answer extraction (`extract`: 'last_number', 'hash' for
       `#### answer`, 'raw', or a regex whose group 1 (else group 0) is the
       answer) and normalization (case, whitespace, thousands commas,
       numerically equal numbers).
`evaluate_models({name: params}, cfg, eval_sets)` gives
`{model: {ability: {metric: value}}}`; `format_table` renders it as Markdown.
Forwards are jitted with params sharded per logical axes and the batch over
('data', 'fsdp').
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from act_jax import forward, generate, losses, sharding
from act_jax.model_config import ModelConfig


@dataclasses.dataclass
class EvalSet:
  """What to measure for one ability (any field may be None)."""

  ppl: Sequence[dict[str, Any]] | None = None  # held-out batches
  mc: Sequence[dict[str, Any]] | None = None  # prompt, choices, answer
  gen: Sequence[dict[str, Any]] | None = None  # prompt, answer
  mc_norm: str = 'sum'  # 'sum' log-prob or 'mean' (length-normalized)
  extract: str = 'last_number'  # last_number | hash | raw | a regex
  max_new_tokens: int = 32  # generation budget per gen item


# ---------------------------------------------------------------- jitting


def _batch_axes_size(mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in ('data', 'fsdp')
                      if a in mesh.shape]))


@functools.lru_cache(maxsize=16)
def _jitted(kind: str, cfg: ModelConfig, mesh):
  fn = {'nll': losses.nll_sum, 'seq': losses.sequence_logprobs}[kind]
  param_sh = sharding.tree_shardings(mesh, forward.logical_axes(cfg),
                                     forward.abstract_params(cfg))
  batch_sh = sharding.named_sharding(mesh, ('batch', 'length'))
  rep = sharding.replicated(mesh)

  def run(params, batch):
    return fn(params, batch, cfg)

  out_sh = (rep, rep) if kind == 'nll' else (
      sharding.named_sharding(mesh, ('batch',)),) * 2
  return jax.jit(run, in_shardings=(param_sh, batch_sh), out_shardings=out_sh)


def _pad_rows(batch: dict[str, np.ndarray], multiple: int):
  """Appends empty rows (all-zero masks) so B is a multiple of `multiple`."""
  b = batch['tokens_bt'].shape[0]
  extra = (-b) % multiple
  if not extra:
    return batch, b
  return {k: np.concatenate([np.asarray(v), np.zeros(
      (extra,) + v.shape[1:], np.asarray(v).dtype)]) for k, v in
          batch.items()}, b


def _run(kind, params, cfg, batch, mesh):
  mesh = mesh or sharding.make_mesh()
  batch = losses.as_loss_batch(batch)
  losses.check_batch(batch)
  batch = {k: np.asarray(v, np.int32) for k, v in batch.items()}
  batch, real = _pad_rows(batch, _batch_axes_size(mesh))
  with sharding.activation_sharding(mesh):
    out = _jitted(kind, cfg, mesh)(params, batch)
  out = jax.device_get(out)
  return out if kind == 'nll' else tuple(x[:real] for x in out)


# ------------------------------------------------------------- perplexity


def perplexity(params, cfg: ModelConfig, batches, *, mesh=None
              ) -> dict[str, float]:
  """Token-weighted `{'nll', 'ppl', 'tokens'}` over the masked targets."""
  total, count = 0.0, 0.0
  for batch in batches:
    s, n = _run('nll', params, cfg, batch, mesh)
    total += float(s)
    count += float(n)
  if count == 0:
    raise ValueError('perplexity: the eval batches have no target tokens')
  nll = total / count
  return {'nll': nll, 'ppl': float(np.exp(nll)), 'tokens': count}


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
  sums, counts = [], []
  for b0 in range(0, len(rows), batch_size):
    chunk = rows[b0:b0 + batch_size]
    batch = {k: np.zeros((len(chunk), length), np.int32) for k in
             losses.REQUIRED_KEYS}
    for r, (ids, plen) in enumerate(chunk):
      batch['tokens_bt'][r, :len(ids)] = ids
      batch['attention_mask_bt'][r, :len(ids)] = 1
      batch['loss_mask_bt'][r, plen:len(ids)] = 1
    s, n = _run('seq', params, cfg, batch, mesh)
    sums.append(s)
    counts.append(n)
  sums, counts = np.concatenate(sums), np.concatenate(counts)
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


# ------------------------------------------------------------ exact match

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


def extract_answer(text: str, mode: str = 'last_number') -> str | None:
  """The answer inside `text` per `mode` (None when nothing matches)."""
  if mode == 'raw':
    return text
  if mode == 'last_number':
    found = _NUMBER.findall(text)
    return found[-1] if found else None
  if mode == 'hash':
    if '####' not in text:
      return None
    return text.split('####', 1)[1].strip().split('\n')[0]
  m = re.search(mode, text)
  if m is None:
    return None
  return m.group(1) if m.groups() else m.group(0)


def _gold(answer: str, mode: str) -> str:
  if '####' in str(answer):
    return normalize_answer(extract_answer(str(answer), 'hash'))
  if mode == 'last_number' and _NUMBER.search(str(answer)):
    return normalize_answer(extract_answer(str(answer), 'last_number'))
  return normalize_answer(answer)


def exact_match(params, cfg: ModelConfig, tokenizer, items, *,
                extract: str = 'last_number', max_new_tokens: int = 32,
                batch_size: int = 8, mesh=None) -> dict[str, Any]:
  """`{'em', 'n', 'outputs'}`: greedy generations scored by exact match."""
  for i, it in enumerate(items):
    if 'prompt' not in it or 'answer' not in it:
      raise ValueError(f'gen item {i}: needs prompt and answer, has '
                       f'{sorted(it)}')
  if mesh is not None:
    batch_size = -(-batch_size // _batch_axes_size(mesh)) * \
        _batch_axes_size(mesh)
  texts = generate.generate_text(params, cfg, tokenizer,
                                 [it['prompt'] for it in items],
                                 max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, mesh=mesh)
  right = sum(
      int(normalize_answer(extract_answer(t, extract)) == _gold(
          it['answer'], extract)) for t, it in zip(texts, items))
  return {'em': right / len(items), 'n': len(items), 'outputs': texts}


# ------------------------------------------------------------------ table


def evaluate_models(models: dict[str, Any], cfg: ModelConfig,
                    eval_sets: dict[str, EvalSet], *, tokenizer=None,
                    batch_size: int = 16, mesh=None
                   ) -> dict[str, dict[str, dict[str, float]]]:
  """Every model on every ability: `{model: {ability: {metric: value}}}`.

  Metrics: `ppl`, `nll` (from `ppl` batches), `mc_acc`, `em`.
  """
  if not models:
    raise ValueError('evaluate_models: no models given')
  if not eval_sets:
    raise ValueError('evaluate_models: no eval sets given')
  out = {}
  for name, params in models.items():
    out[name] = {}
    for ability, es in eval_sets.items():
      row = {}
      if es.ppl:
        r = perplexity(params, cfg, es.ppl, mesh=mesh)
        row['ppl'], row['nll'] = r['ppl'], r['nll']
      if es.mc:
        row['mc_acc'] = mc_accuracy(params, cfg, es.mc, tokenizer=tokenizer,
                                    norm=es.mc_norm, batch_size=batch_size,
                                    mesh=mesh)['acc']
      if es.gen:
        row['em'] = exact_match(params, cfg, tokenizer, es.gen,
                                extract=es.extract,
                                max_new_tokens=es.max_new_tokens,
                                batch_size=min(batch_size, 8),
                                mesh=mesh)['em']
      if not row:
        raise ValueError(f'eval set {ability!r} has no ppl, mc or gen data')
      out[name][ability] = row
    del params
  return out


def format_table(results: dict[str, dict[str, dict[str, float]]],
                 digits: int = 3) -> str:
  """Markdown: one row per model, one column per (ability, metric)."""
  cols = []
  for per_model in results.values():
    for ability, metrics in per_model.items():
      for m in metrics:
        if (ability, m) not in cols:
          cols.append((ability, m))
  lines = ['| model | ' + ' | '.join(f'{a} {m}' for a, m in cols) + ' |',
           '|---|' + '---|' * len(cols)]
  for name, per_model in results.items():
    vals = []
    for a, m in cols:
      v = per_model.get(a, {}).get(m)
      vals.append('-' if v is None else f'{v:.{digits}f}')
    lines.append(f'| {name} | ' + ' | '.join(vals) + ' |')
  return '\n'.join(lines)
