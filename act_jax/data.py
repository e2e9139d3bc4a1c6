"""Probe and SFT data: records -> tokens -> fixed-shape batches with masks.

Pipeline (each step a plain function, usable alone):
  load_records(path)              list of dicts, from jsonl/json/parquet/txt,
                                  a `save_to_disk` directory, or a Hub name
  check_fields(records, ...)      clear error before any tokenization
  render(record, template, ...)   one rendering per ability: text | qa | chat
  encode_record(record, tok, cfg) its ids, response mask and prompt: the
                                  one tokenization every use shares
  tokenize_records(records, tok)  Example(ids, response mask) per record,
                                  with overflow handling (truncate | chunk |
                                  error)
  generation_items(records, ...)  greedy-generation prompts (the same ids)
  make_batches(examples, ...)     fixed `[B, T]` numpy batches (pad or pack)
  local_batches(batches, i, n)    process i's contiguous slice, padded with
                                  empty batches so every process steps alike
  mix_sources([(recs, w)], seed)  weighted mixture of several record lists
A batch is a dict of int32 `[B, T]` arrays: `tokens_bt`, `attention_mask_bt`
(1 = real token), `token_mask_bt` (1 = token counts: every real token, or
only response tokens with `loss_on='response'`; the same mask is the SFT
loss mask), `positions_bt` (RoPE positions, reset per packed document) and
`segment_ids_bt` (1, 2, ... per document within a row, 0 for padding; the
model keeps attention inside a document).
Rows are right-padded; a final partial batch is filled with empty rows
(all-zero masks), so a jitted step compiles once.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from typing import Any, Iterable, NamedTuple, Sequence

from absl import logging
import jinja2
import numpy as np

from act_jax.io import atomic
from act_jax.io import inputs as inputs_lib


OVERFLOWS = ('truncate', 'chunk', 'error')
BATCH_KEYS = ('tokens_bt', 'attention_mask_bt', 'token_mask_bt',
              'positions_bt', 'segment_ids_bt')
_EXT_BUILDERS = {'.jsonl': 'json', '.json': 'json', '.parquet': 'parquet',
                 '.txt': 'text', '.csv': 'csv'}
FILE_TYPES = tuple(_EXT_BUILDERS)  # data file extensions load_records reads


class DataError(ValueError):
  """Bad data input; the message names the file, field or option."""


# -------------------------------------------------------------- rendering

TEMPLATES = ('text', 'qa', 'chat')
DEFAULT_QA_FORMAT = 'Question: {prompt}\nAnswer: {response}'


class TemplateError(ValueError):
  """A record or template that cannot be rendered; names source and field."""


def required_fields(template: str, text_field: str, prompt_field: str,
                    response_field: str) -> tuple[str, ...]:
  """The record fields `template` reads."""
  if template == 'text':
    return (text_field,)
  if template in ('qa', 'chat'):
    return (prompt_field, response_field)
  raise TemplateError(f'unknown template {template!r}; known: '
                      f'{", ".join(TEMPLATES)}')


def check_qa_format(qa_format: str) -> None:
  """Raises TemplateError unless `qa_format` has {prompt} before {response}."""
  p, r = qa_format.find('{prompt}'), qa_format.find('{response}')
  if p < 0 or r < 0 or r < p:
    raise TemplateError(f'qa_format {qa_format!r} must contain {{prompt}} '
                        'followed by {response}')


def render(record: dict[str, Any], template: str, *, text_field: str = 'text',
           prompt_field: str = 'question', response_field: str = 'answer',
           qa_format: str = DEFAULT_QA_FORMAT,
           tokenizer: Any = None) -> tuple[str, int]:
  """Renders one record.

  Returns:
    (text, response_start): the full text and the character offset at which
    the response begins (0 for 'text': every token is response).
  """
  if template == 'text':
    return str(record[text_field]), 0
  prompt, response = str(record[prompt_field]), str(record[response_field])
  if template == 'qa':
    head, tail = qa_format.split('{response}', 1)
    head = head.replace('{prompt}', prompt)
    tail = tail.replace('{prompt}', prompt)
    return head + response + tail, len(head)
  if template == 'chat':
    if tokenizer is None or not getattr(tokenizer, 'chat_template', None):
      raise TemplateError("template 'chat' needs a tokenizer with a chat "
                          'template (tokenizer_config.json chat_template)')
    user = [{'role': 'user', 'content': prompt}]
    full = user + [{'role': 'assistant', 'content': response}]
    # transformers renders in jinja2's ImmutableSandboxedEnvironment; a
    # template that fails there (syntax, undefined names, unsafe access) is
    # the checkpoint's fault: one line naming its file.
    try:
      head = tokenizer.apply_chat_template(user, tokenize=False,
                                           add_generation_prompt=True)
      text = tokenizer.apply_chat_template(full, tokenize=False)
    except jinja2.TemplateError as e:
      where = getattr(tokenizer, 'name_or_path', '') or '<tokenizer>'
      jinja = os.path.join(where, 'chat_template.jinja')
      where = jinja if os.path.isfile(jinja) else os.path.join(
          where, 'tokenizer_config.json')
      raise TemplateError(f'chat template of {where} fails to render: '
                          f'{type(e).__name__}: {e}') from None
    if not text.startswith(head):
      raise TemplateError('chat template: the prompt-only rendering is not a '
                          'prefix of the full conversation; cannot locate '
                          'the response')
    return text, len(head)
  raise TemplateError(f'unknown template {template!r}; known: '
                      f'{", ".join(TEMPLATES)}')


# ---------------------------------------------------------------- batches


@dataclasses.dataclass
class DataConfig:
  """How to turn a data source into batches (ml_collections-friendly)."""

  path: str = ''  # file, saved dataset dir, or Hub name
  split: str = 'train'  # dataset split (Hub names and saved DatasetDicts)
  template: str = 'text'  # text | qa | chat (see data.py)
  text_field: str = 'text'  # field read by template 'text'
  prompt_field: str = 'question'  # prompt field for 'qa' and 'chat'
  response_field: str = 'answer'  # response field for 'qa' and 'chat'
  qa_format: str = DEFAULT_QA_FORMAT  # 'qa' join format
  max_seq_len: int = 128  # T, tokens per row
  batch_size: int = 8  # B, rows per (per-process) batch
  pack: bool = False  # pack several texts per row (attention crosses them)
  loss_on: str = 'all'  # which tokens count: all | response
  overflow: str = 'truncate'  # texts longer than T: truncate | chunk | error
  add_special_tokens: bool = True  # tokenizer's BOS etc. ('text' and 'qa')
  add_eos: bool = False  # append the EOS token (SFT)
  shuffle_seed: int | None = None  # None keeps file order
  limit: int = 0  # use only the first `limit` records (0 = all)


class Example(NamedTuple):
  """One tokenized record: ids `[n]` and response mask `[n]` (int32)."""
  ids: np.ndarray
  response: np.ndarray


class Tokenized(NamedTuple):
  examples: list[Example]
  num_truncated: int  # texts cut to max_seq_len
  num_tokens: int  # tokens kept (before padding)


def load_records(path: str, split: str = 'train',
                 limit: int = 0) -> list[dict[str, Any]]:
  """Reads records with `datasets` (no network unless `path` is a Hub name).

  Raises:
    DataError naming `path` when it cannot be read or has no records.
  """
  # JSON files are read as written, without importing `datasets` (seconds).
  records = None
  inputs_lib.note_read(path)
  if os.path.isfile(path) and path.lower().endswith('.jsonl'):
    records = read_jsonl(path)
  elif os.path.isfile(path) and path.lower().endswith('.json'):
    records = _json_records(path)
  if records is not None:
    return records[:limit] if limit else records
  import datasets  # pylint: disable=g-import-not-at-top  (slow import)
  try:
    if os.path.isdir(path):
      ds = datasets.load_from_disk(path)
      if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
          raise DataError(f'{path}: no split {split!r}; splits: '
                          f'{sorted(ds)}')
        ds = ds[split]
    elif os.path.isfile(path):
      ext = os.path.splitext(path)[1].lower()
      if ext not in _EXT_BUILDERS:
        raise DataError(f'{path}: unknown data file type {ext!r}; expected '
                        f'one of {sorted(_EXT_BUILDERS)}')
      if os.path.getsize(path) == 0:
        raise DataError(f'{path}: the data file is empty (no records)')
      ds = datasets.load_dataset(_EXT_BUILDERS[ext], data_files=path,
                                 split='train')
    elif (path.startswith(('/', '.', '~')) or
          os.path.splitext(path)[1].lower() in _EXT_BUILDERS):
      raise DataError(f'{path}: no such file or directory')
    else:
      ds = datasets.load_dataset(path, split=split)
  except DataError:
    raise
  except Exception as e:  # datasets raises many types; name the file
    raise DataError(f'{path}: cannot read records ({type(e).__name__}: '
                    f'{e})') from e
  if limit:
    ds = ds.select(range(min(limit, len(ds))))
  records = ds.to_list()
  if not records:
    raise DataError(f'{path}: the data set is empty (no records)')
  return records


# The most bytes one JSONL record (line) may hold: a record is tokenized
# whole before truncation, so one huge line would take tens of GB (a 60 MB
# prompt was killed by the kernel at 19 GB); checked while reading.
MAX_RECORD_BYTES = 8 << 20


def read_jsonl(path: str, max_record_bytes: int = MAX_RECORD_BYTES
               ) -> list[dict[str, Any]]:
  """The records of a JSONL file, exactly as written (no type coercion).

  Raises:
    DataError naming the file and (1-based) line of a record that is not
    UTF-8 (with its byte offset), not a JSON object, or over
    `max_record_bytes`; or an empty file.
  """
  inputs_lib.note_read(path)
  out = []
  offset = 0
  with open(path, 'rb') as f:
    for n in itertools.count(1):
      raw = f.readline(max_record_bytes + 1)
      if not raw:
        break
      if len(raw) > max_record_bytes and not raw.endswith(b'\n'):
        raise DataError(f'{path}: line {n} is over {max_record_bytes} bytes '
                        f'(data.MAX_RECORD_BYTES); split or shorten the '
                        'record')
      try:
        line = raw.decode('utf-8')
      except UnicodeDecodeError as e:
        raise DataError(f'{path}: line {n} is not UTF-8 (byte offset '
                        f'{offset + e.start}); re-encode the file as UTF-8'
                        ) from None
      offset += len(raw)
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f'{path}: line {n} is not JSON ({e.msg})') from None
      if not isinstance(rec, dict):
        raise DataError(f'{path}: line {n} is not a JSON object')
      out.append(rec)
  if not out:
    raise DataError(f'{path}: the data file is empty (no records)')
  return out


def _json_records(path: str) -> list[dict[str, Any]] | None:
  """The records of a .json file holding a list of objects or JSON lines,
  read as written; None for other layouts (left to `datasets`).

  Raises:
    DataError naming the file and line of the first bad record.
  """
  with open(path, encoding='utf-8') as f:
    text = f.read()
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    if text.lstrip().startswith('['):
      raise DataError(f'{path}: line {e.lineno} is not JSON ({e.msg})'
                      ) from None
    return read_jsonl(path)  # JSON lines; names the bad line
  if not isinstance(obj, list):
    return None
  for i, rec in enumerate(obj):
    if not isinstance(rec, dict):
      raise DataError(f'{path}: record {i + 1} is not a JSON object')
  if not obj:
    raise DataError(f'{path}: the data file is empty (no records)')
  return obj


def write_jsonl(path: str, records: Sequence[dict[str, Any]]) -> str:
  """Writes records as JSONL, atomically; returns `path`."""
  return atomic.write_text(path, ''.join(
      json.dumps(r, ensure_ascii=False, sort_keys=True) + '\n'
      for r in records))


def check_fields(records: Sequence[dict[str, Any]], cfg: DataConfig,
                 source: str = '') -> None:
  """Raises DataError naming the missing field, the source and those present.

  Also checks the template, qa_format, loss_on and overflow options.
  """
  source = source or cfg.path or '<records>'
  if not records:
    raise DataError(f'{source}: the data set is empty (no records)')
  if cfg.loss_on not in ('all', 'response'):
    raise DataError(f"loss_on={cfg.loss_on!r}: expected 'all' or 'response'")
  if cfg.overflow not in OVERFLOWS:
    raise DataError(f'overflow={cfg.overflow!r}: expected one of '
                    f'{", ".join(OVERFLOWS)}')
  try:
    fields = required_fields(cfg.template, cfg.text_field,
                             cfg.prompt_field, cfg.response_field)
    if cfg.template == 'qa':
      check_qa_format(cfg.qa_format)
  except TemplateError as e:
    raise DataError(f'{source}: {e}') from e
  for i, rec in enumerate(records, start=1):  # 1-based, like line numbers
    for f in fields:
      value = rec.get(f)
      if value is None:
        # Readers that unify a schema (datasets' json / parquet) give a
        # record the fields of the others, as None: those it lacks.
        have = sorted(k for k, v in rec.items() if v is not None)
        how = 'field {!r} is null'.format(f) if f in rec else (
            f'has no field {f!r}')
        raise DataError(
            f'{source}: record {i} {how} (needed by template '
            f'{cfg.template!r}); that record has the fields {have}')
      if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(
            f'{source}: record {i}: field {f!r} is a '
            f'{type(value).__name__}, expected a string (template '
            f'{cfg.template!r})')


def encode_record(record: dict[str, Any], tokenizer: Any, cfg: DataConfig
                 ) -> tuple[list[int], list[int], int, str]:
  """One record's token ids, response mask, prompt length and prompt text.

  The one tokenization of a record, shared by every use (probe rows, SFT
  rows, perplexity rows and generation prompts). The prompt (everything the
  rendering puts before the response: the qa_format's head, the chat
  template's user turn and generation prompt) is tokenized alone, exactly
  as transformers' `generate` on the rendered prompt sees it; the rest of
  the rendering continues those ids: the full rendering's own tokens when
  they start with the prompt's, else (a token spans the boundary, e.g. a
  byte-level BPE merging a qa_format's trailing space into the answer's
  first word) the rest tokenized alone. So every use agrees token for token
  up to the response, and the response mask is 1 from the first token after
  the prompt. Template 'text' has no prompt: every non-special token is
  response.

  Special tokens (BOS, ...) are added by the tokenizer for 'text' and 'qa'
  when `cfg.add_special_tokens`; a chat template writes its own.

  Raises:
    TemplateError when the record cannot be rendered.
  """
  text, start = render(
      record, cfg.template, text_field=cfg.text_field,
      prompt_field=cfg.prompt_field, response_field=cfg.response_field,
      qa_format=cfg.qa_format, tokenizer=tokenizer)
  specials = cfg.add_special_tokens and cfg.template != 'chat'
  if cfg.template == 'text':
    enc = tokenizer(text, add_special_tokens=specials,
                    return_special_tokens_mask=True)
    ids = list(enc['input_ids'])
    return ids, [1 - int(m) for m in enc['special_tokens_mask']], 0, ''
  prompt = text[:start]
  head = list(tokenizer(prompt, add_special_tokens=specials)['input_ids'])
  full = list(tokenizer(text, add_special_tokens=specials)['input_ids'])
  if full[:len(head)] == head:
    ids = full
  else:
    ids = head + list(tokenizer(text[start:],
                                add_special_tokens=False)['input_ids'])
  return ids, [0] * len(head) + [1] * (len(ids) - len(head)), len(head), prompt


def tokenize_records(records: Sequence[dict[str, Any]], tokenizer: Any,
                     cfg: DataConfig, source: str = '') -> Tokenized:
  """Renders and tokenizes every record (`encode_record`); handles overflow
  per `cfg.overflow`; appends EOS (a response token) with `cfg.add_eos`."""
  source = source or cfg.path or '<records>'
  check_fields(records, cfg, source)
  order = np.arange(len(records))
  if cfg.shuffle_seed is not None:
    order = np.random.default_rng(cfg.shuffle_seed).permutation(len(records))
  examples, truncated, kept = [], 0, 0
  for i in order:
    try:
      ids, resp, _, _ = encode_record(records[i], tokenizer, cfg)
    except TemplateError as e:
      raise DataError(f'{source}: record {i + 1}: {e}') from e
    if cfg.add_eos and tokenizer.eos_token_id is not None:
      ids.append(tokenizer.eos_token_id)
      resp.append(1)
    ids, resp = np.asarray(ids, np.int32), np.asarray(resp, np.int32)
    t = cfg.max_seq_len
    if len(ids) > t and cfg.overflow == 'error':
      raise DataError(
          f'{source}: record {i + 1} has {len(ids)} tokens > max_seq_len={t} '
          '(use overflow=truncate or chunk, or a longer max_seq_len)')
    if len(ids) > t and cfg.overflow == 'chunk':
      # Long plain text is cut into rows of T tokens (a 1-token piece has no
      # target and is dropped), so no token of the text is thrown away.
      pieces = [Example(ids[j:j + t], resp[j:j + t])
                for j in range(0, len(ids), t) if len(ids[j:j + t]) > 1]
    else:
      truncated += int(len(ids) > t)
      pieces = [Example(ids[:t], resp[:t])]
    kept += sum(len(x.ids) for x in pieces)
    examples.extend(pieces)
  if truncated:
    logging.warning('%s: truncated %d of %d texts to max_seq_len=%d', source,
                    truncated, len(records), cfg.max_seq_len)
  return Tokenized(examples, truncated, kept)


def empty_batch(batch_size: int, max_seq_len: int) -> dict[str, np.ndarray]:
  """A batch of empty rows (all masks zero): counts nothing."""
  return {k: np.zeros((batch_size, max_seq_len), np.int32) for k in BATCH_KEYS}


def _rows(examples: Sequence[Example], max_seq_len: int,
          pack: bool) -> list[list[Example]]:
  if not pack:
    return [[ex] for ex in examples]
  rows, cur, used = [], [], 0
  for ex in examples:
    if cur and used + len(ex.ids) > max_seq_len:
      rows.append(cur)
      cur, used = [], 0
    cur.append(ex)
    used += len(ex.ids)
  if cur:
    rows.append(cur)
  return rows


def make_batches(examples: Sequence[Example], batch_size: int,
                 max_seq_len: int, *, pack: bool = False,
                 loss_on: str = 'all') -> list[dict[str, np.ndarray]]:
  """Fixed-shape `[B, T]` batches, right-padded; last batch filled with
  empty rows. Examples must already fit `max_seq_len` (tokenize_records)."""
  if loss_on not in ('all', 'response'):
    raise DataError(f"loss_on={loss_on!r}: expected 'all' or 'response'")
  rows = _rows(examples, max_seq_len, pack)
  batches = []
  for b0 in range(0, len(rows), batch_size):
    batch = empty_batch(batch_size, max_seq_len)
    for r, row in enumerate(rows[b0:b0 + batch_size]):
      t = 0
      for doc, ex in enumerate(row, start=1):
        n = len(ex.ids)
        if t + n > max_seq_len:
          raise DataError(f'an example of {n} tokens does not fit '
                          f'max_seq_len={max_seq_len}')
        batch['tokens_bt'][r, t:t + n] = ex.ids
        batch['attention_mask_bt'][r, t:t + n] = 1
        batch['token_mask_bt'][r, t:t + n] = (
            ex.response if loss_on == 'response' else 1)
        batch['positions_bt'][r, t:t + n] = np.arange(n)
        batch['segment_ids_bt'][r, t:t + n] = doc
        t += n
    batches.append(batch)
  return batches


def local_batches(batches: Sequence[dict[str, np.ndarray]],
                  process_index: int = 0,
                  process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """Process `process_index`'s contiguous slice of `batches`.

  Every process gets `ceil(n / process_count)` batches (the short slices end
  with empty batches), so all processes run the same number of steps and
  the union of the slices is exactly `batches`.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} outside '
                     f'[0, {process_count})')
  n = len(batches)
  per = -(-n // process_count)
  mine = list(batches[process_index * per:(process_index + 1) * per])
  if batches and len(mine) < per:
    b, t = batches[0]['tokens_bt'].shape
    mine += [empty_batch(b, t) for _ in range(per - len(mine))]
  return mine


def mix_sources(sources: Sequence[tuple[Sequence[dict[str, Any]], float]],
                seed: int = 0, total: int | None = None
               ) -> list[dict[str, Any]]:
  """A weighted, shuffled mixture of several record lists.

  Source i contributes `round(total * w_i / sum(w))` records (sampled
  without replacement while it has enough, then cycled); `total` defaults
  to the sum of the sources' sizes. Same seed, same mixture.
  """
  if not sources:
    raise DataError('mix_sources needs at least one (records, weight)')
  weights = np.asarray([w for _, w in sources], np.float64)
  if (weights < 0).any() or weights.sum() <= 0:
    raise DataError(f'mix_sources weights must be >= 0 with a positive sum, '
                    f'got {weights.tolist()}')
  for i, (recs, w) in enumerate(sources):
    if w > 0 and not recs:
      raise DataError(f'mix_sources: source {i} has weight {w} but no records')
  total = sum(len(r) for r, _ in sources) if total is None else total
  rng = np.random.default_rng(seed)
  counts = np.floor(total * weights / weights.sum()).astype(int)
  counts[np.argmax(weights)] += total - counts.sum()
  mixed = []
  for (recs, _), k in zip(sources, counts):
    if k <= 0:
      continue
    reps = -(-k // len(recs))
    idx = np.concatenate([rng.permutation(len(recs)) for _ in range(reps)])
    mixed.extend(recs[j] for j in idx[:k])
  return [mixed[j] for j in rng.permutation(len(mixed))]


def mix_examples(sources: Sequence[tuple[Sequence[Example], float]],
                 num_tokens: int, seed: int = 0) -> list[Example]:
  """A seeded mixture holding about `w_i / sum(w)` of `num_tokens` tokens
  from source i (each source cycled in reshuffled passes), shuffled
  together. The token-weighted counterpart of `mix_sources`."""
  rng = np.random.default_rng(seed)
  weights = np.asarray([w for _, w in sources], np.float64)
  if not sources or (weights < 0).any() or weights.sum() <= 0:
    raise DataError(f'mix_examples weights must be >= 0 with a positive sum, '
                    f'got {weights.tolist()}')
  out = []
  for i, ((exs, _), w) in enumerate(zip(sources, weights / weights.sum())):
    if w <= 0:
      continue
    if not exs:
      raise DataError(f'mix_examples: source {i} has weight {w} but no '
                      'examples')
    want, got = w * num_tokens, 0
    while got < want:
      for j in rng.permutation(len(exs)):
        out.append(exs[j])
        got += len(exs[j].ids)
        if got >= want:
          break
  return [out[j] for j in rng.permutation(len(out))]


def generation_items(records: Sequence[dict[str, Any]], tokenizer: Any,
                     cfg: DataConfig, answers_field: str = 'answers',
                     source: str = '') -> list[dict[str, Any]]:
  """Greedy-generation items: the rendered prompt (everything before the
  response, e.g. the chat template's user turn and generation prompt), its
  token ids (`encode_record`'s, so the ids a probe or SFT row of the same
  record starts with), and the accepted answers (`answers_field` when a
  record has that non-empty list, else its response field).
  """
  source = source or cfg.path or '<records>'
  if cfg.template == 'text':
    raise DataError(f'{source}: template text has no prompt to generate '
                    'from (use qa or chat for exact_match abilities)')
  check_fields(records, cfg, source)
  items = []
  for i, rec in enumerate(records):
    try:
      ids, _, plen, prompt = encode_record(rec, tokenizer, cfg)
    except TemplateError as e:
      raise DataError(f'{source}: record {i + 1}: {e}') from e
    answers = rec.get(answers_field)
    if not isinstance(answers, (list, tuple)) or not answers:
      answers = [rec[cfg.response_field]]
    if not plen:
      raise DataError(f'{source}: record {i + 1}: the rendered prompt is empty')
    items.append({'prompt': prompt, 'prompt_ids': ids[:plen],
                  'answers': [str(a) for a in answers]})
  return items


def load_batches(cfg: DataConfig, tokenizer: Any,
                 records: Iterable[dict[str, Any]] | None = None
                ) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
  """load_records + tokenize_records + make_batches for one DataConfig.

  Returns:
    (batches, info) with info = {path, template, fields, num_texts,
    num_tokens, num_truncated, max_seq_len, batch_size, pack, loss_on}.
  """
  if records is None:
    records = load_records(cfg.path, cfg.split, cfg.limit)
  records = list(records)
  tok = tokenize_records(records, tokenizer, cfg)
  batches = make_batches(tok.examples, cfg.batch_size, cfg.max_seq_len,
                         pack=cfg.pack, loss_on=cfg.loss_on)
  if records and not any(b['token_mask_bt'].any() for b in batches):
    # Statistics or a loss over no token at all would pass silently as 0.
    raise DataError(f'{cfg.path or "<records>"}: no token to count in '
                    f'{len(records)} records (every text renders empty, or '
                    f'loss_on={cfg.loss_on!r} masks every token)')
  info = {
      'path': cfg.path, 'template': cfg.template,
      'fields': list(required_fields(
          cfg.template, cfg.text_field, cfg.prompt_field, cfg.response_field)),
      'qa_format': cfg.qa_format if cfg.template == 'qa' else None,
      'num_texts': len(records), 'num_tokens': tok.num_tokens,
      'num_truncated': tok.num_truncated, 'max_seq_len': cfg.max_seq_len,
      'batch_size': cfg.batch_size, 'pack': cfg.pack, 'loss_on': cfg.loss_on,
      'overflow': cfg.overflow, 'shuffle_seed': cfg.shuffle_seed,
  }
  return batches, info
