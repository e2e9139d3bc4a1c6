"""Writes every data set of the SmolLM2 forgetting case as JSONL files.

Sources: English prose of the Python standard library (`conlang.
english_paragraphs`), the hand-written QA set (`qa.py`) and, with
`facts`, factual QA built from the `countryinfo` package's data
(`facts.py`). Each paragraph goes, by a seeded hash of its text, to exactly
one of: held-out English (perplexity eval), English probe text
(localization), held-out conlang (perplexity eval of the specialist's new
language) or conlang training text; the dev paragraphs are the held-out
buckets' next ones after the eval cap, so asking for a dev split changes no
other file. QA items split per category into eval (test), dev and train
(`qa.split_three`). Files (all in `data_dir`):

  conlang_train.jsonl  {'text'}  specialist's continued-training text
  conlang_eval.jsonl   {'text'}  held-out conlang (new-language perplexity)
  conlang_dev.jsonl    {'text'}  its dev split (empty unless configured)
  english_eval.jsonl   {'text'}  held-out English (English perplexity)
  english_dev.jsonl    {'text'}  its dev split (empty unless configured)
  english_probe.jsonl  {'text'}  English prose for the ability's probe set
  qa_eval.jsonl        {'question', 'answer', 'answers', 'category'}: test
  qa_dev.jsonl         same fields: the dev split (empty unless configured)
  qa_train.jsonl       same fields; probe set and fine-tune data
  manifest.json        counts and a SHA-256 digest of every file

Same seed, same files (given the same Python minor version, whose stdlib is
the source text; the digest makes a difference visible).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

from act_jax.cases.smollm2 import conlang
from act_jax.cases.smollm2 import facts as facts_lib
from act_jax.cases.smollm2 import qa
from act_jax.io import atomic

FILES = ('conlang_train', 'conlang_eval', 'conlang_dev', 'english_eval',
         'english_dev', 'english_probe', 'qa_eval', 'qa_dev', 'qa_train')


@dataclasses.dataclass
class CorpusConfig:
  """The `data` sub-config of the case."""

  seed: int = 0  # split seed (paragraph buckets and QA halves)
  conlang_seed: int = 0  # seed of the word -> conlang-word mapping
  english_eval_paragraphs: int = 48  # held-out English texts
  conlang_eval_paragraphs: int = 48  # held-out conlang texts
  english_probe_paragraphs: int = 64  # English prose in the probe set
  conlang_train_paragraphs: int = 0  # 0 = all remaining paragraphs
  qa_eval_frac: float = 0.5  # fraction of each QA category held out
  stdlib_docstrings: bool = True  # add stdlib docstrings to the prose
  english_dev_paragraphs: int = 0  # held-out English of the dev split
  conlang_dev_paragraphs: int = 0  # held-out conlang of the dev split
  qa_dev_frac: float = 0.0  # fraction of each QA category in the dev split
  facts: str = ''  # comma list of fact kinds (facts.KINDS) added to the QA
  facts_min_population: int = 0  # skip territories with fewer inhabitants
  facts_per_kind: int = 0  # first N items of each fact kind (0 = all)


def _bucket(seed: int, text: str) -> int:
  return int.from_bytes(
      hashlib.sha256(f'{seed}:{text}'.encode()).digest()[:4], 'little') % 100


def split_paragraphs(cfg: CorpusConfig) -> dict[str, list[str]]:
  """English paragraphs per role: eval (5%), probe (5%), conlang eval (5%),
  conlang train (rest), each capped by `cfg`; the dev roles are the next
  paragraphs of the eval buckets after their caps."""
  roles = {'english_eval': [], 'english_probe': [], 'conlang_eval': [],
           'conlang_train': []}
  for text in conlang.english_paragraphs(cfg.stdlib_docstrings):
    b = _bucket(cfg.seed, text)
    role = ('english_eval' if b < 5 else 'english_probe' if b < 10 else
            'conlang_eval' if b < 15 else 'conlang_train')
    roles[role].append(text)
  caps = {'english_eval': cfg.english_eval_paragraphs,
          'english_probe': cfg.english_probe_paragraphs,
          'conlang_eval': cfg.conlang_eval_paragraphs,
          'conlang_train': cfg.conlang_train_paragraphs}
  devs = {}
  for role, n in (('english', cfg.english_dev_paragraphs),
                  ('conlang', cfg.conlang_dev_paragraphs)):
    cap, bucket = caps[f'{role}_eval'], roles[f'{role}_eval']
    if n and not cap:
      raise ValueError(f'data.{role}_dev_paragraphs={n} needs '
                       f'data.{role}_eval_paragraphs > 0 (dev paragraphs '
                       'are the held-out ones after the eval cap)')
    if n and len(bucket) < cap + n:
      raise ValueError(f'data.{role}_dev_paragraphs={n}: only '
                       f'{len(bucket) - cap} held-out paragraphs remain after '
                       f'the {cap} eval ones')
    devs[f'{role}_dev'] = bucket[cap:cap + n]
  for role, cap in caps.items():
    if cap:
      if len(roles[role]) < cap:
        raise ValueError(f'data.{role}_paragraphs={cap} but only '
                         f'{len(roles[role])} paragraphs fall in that split')
      roles[role] = roles[role][:cap]
  roles.update(devs)
  return roles


def qa_records(items: list[qa.QAItem]) -> list[dict[str, Any]]:
  """QA items as records: canonical `answer` + every accepted `answers`."""
  return [{'question': it.question, 'answer': it.answers[0],
           'answers': list(it.answers), 'category': it.category}
          for it in items]


def qa_items(cfg: CorpusConfig) -> list[qa.QAItem]:
  """The hand-written set plus the configured fact kinds (a fact whose
  question the hand-written set already asks is left out)."""
  items = qa.all_items()
  kinds = tuple(k.strip() for k in cfg.facts.split(',') if k.strip())
  if kinds:
    asked = {it.question for it in items}
    items += [it for it in facts_lib.fact_items(
        kinds, cfg.facts_min_population, cfg.facts_per_kind)
              if it.question not in asked]
  return items


def build_records(cfg: CorpusConfig) -> dict[str, list[dict[str, Any]]]:
  """Every data set as a list of records (nothing written)."""
  paras = split_paragraphs(cfg)
  qa_eval, qa_dev, qa_train = qa.split_three(qa_items(cfg), cfg.seed,
                                             cfg.qa_eval_frac, cfg.qa_dev_frac)
  text = lambda role: [{'text': t} for t in paras[role]]
  conlang_text = lambda role: [
      {'text': conlang.translate(t, cfg.conlang_seed)} for t in paras[role]]
  out = {
      'english_eval': text('english_eval'),
      'english_dev': text('english_dev'),
      'english_probe': text('english_probe'),
      'conlang_eval': conlang_text('conlang_eval'),
      'conlang_dev': conlang_text('conlang_dev'),
      'conlang_train': conlang_text('conlang_train'),
      'qa_eval': qa_records(qa_eval),
      'qa_dev': qa_records(qa_dev),
      'qa_train': qa_records(qa_train),
  }
  return out


def _dump_jsonl(records: list[dict[str, Any]]) -> bytes:
  return ''.join(json.dumps(r, ensure_ascii=False, sort_keys=True) + '\n'
                 for r in records).encode()


def write_corpus(data_dir: str, cfg: CorpusConfig) -> dict[str, Any]:
  """Writes the files (each atomically) and the manifest.

  Returns the manifest: `{name: {'records', 'sha256'}}` plus the config.
  An existing, complete `data_dir` with the same config is reused.
  """
  manifest_path = os.path.join(data_dir, 'manifest.json')
  want_cfg = dataclasses.asdict(cfg)
  if os.path.isfile(manifest_path):
    old = atomic.read_json(manifest_path)
    if old.get('config') == want_cfg and all(
        os.path.isfile(os.path.join(data_dir, f'{n}.jsonl')) for n in FILES):
      return old
  os.makedirs(data_dir, exist_ok=True)
  manifest: dict[str, Any] = {'config': want_cfg, 'files': {}}
  for name, records in build_records(cfg).items():
    blob = _dump_jsonl(records)
    atomic.write_bytes(os.path.join(data_dir, f'{name}.jsonl'), blob)
    manifest['files'][name] = {'records': len(records),
                               'sha256': hashlib.sha256(blob).hexdigest()}
  atomic.write_json(manifest_path, manifest)
  return manifest
