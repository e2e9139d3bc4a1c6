"""Checked inputs for statistics collection: related models and tokenizers.

Everything here fails by name before heavy work: models of different
architectures (first differing config field, naming both directories),
different param shapes (first differing leaf), and a probe tokenizer that
differs from a model's own (vocabulary or special token ids).
Models load through `checkpoint.load_model` when that module exists (params
dirs and HF dirs), else `hf_convert.load_hf_params` (HF dirs).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from absl import logging
import jax
import jax.numpy as jnp

from act_jax import hf_convert
from act_jax.model_config import ModelConfig


class InputError(ValueError):
  """Incompatible models or tokenizers; the message names both paths."""


def _checkpoint_module():
  try:
    from act_jax import checkpoint  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return checkpoint


def load_config(path: str) -> ModelConfig:
  """The ModelConfig of a model directory, without reading weights."""
  if os.path.isfile(os.path.join(path, 'config.json')):
    return hf_convert.load_hf_config(path)
  ckpt = _checkpoint_module()
  if ckpt is not None and os.path.isfile(os.path.join(path,
                                                       'model_config.json')):
    return ckpt.load_model_config(path)
  if not os.path.isdir(path):
    raise InputError(f'{path}: no such model directory')
  return load_model(path)[0]


def load_model(path: str) -> tuple[ModelConfig, Any]:
  """(cfg, params) of a params dir or an HF dir."""
  ckpt = _checkpoint_module()
  if ckpt is not None and hasattr(ckpt, 'load_model'):
    return ckpt.load_model(path)
  if not os.path.isfile(os.path.join(path, 'config.json')):
    raise InputError(f'{path}: not an HF model directory (no config.json) '
                     'and act_jax.checkpoint is not available')
  return hf_convert.load_hf_params(path)


def check_same_architecture(paths: Sequence[str],
                            cfgs: Sequence[ModelConfig]) -> None:
  """Raises InputError naming both dirs and the first differing field."""
  ref = cfgs[0].to_dict()
  for path, cfg in zip(paths[1:], cfgs[1:]):
    other = cfg.to_dict()
    for key in sorted(set(ref) | set(other)):
      if ref.get(key) != other.get(key):
        raise InputError(
            f'models {paths[0]} and {path} have different architectures: '
            f'{key} = {ref.get(key)!r} vs {other.get(key)!r}')


def check_same_shapes(paths: Sequence[str], params: Sequence[Any]) -> None:
  """Raises InputError naming both dirs and the first differing leaf."""
  ref = {jax.tree_util.keystr(p): x.shape
         for p, x in jax.tree_util.tree_leaves_with_path(params[0])}
  for path, tree in zip(paths[1:], params[1:]):
    other = {jax.tree_util.keystr(p): x.shape
             for p, x in jax.tree_util.tree_leaves_with_path(tree)}
    for key in sorted(set(ref) | set(other)):
      if ref.get(key) != other.get(key):
        raise InputError(
            f'models {paths[0]} and {path} differ at param {key}: '
            f'{ref.get(key)} vs {other.get(key)}')


def load_related_models(paths: Sequence[str], dtype: str | None = None
                       ) -> tuple[ModelConfig, list[Any]]:
  """Loads and checks K related models; casts params to `dtype` if given.

  Configs are compared before any weights are read.
  """
  if not paths:
    raise InputError('no models given')
  cfgs = [load_config(p) for p in paths]
  check_same_architecture(paths, cfgs)
  loaded = [load_model(p) for p in paths]
  params = [p for _, p in loaded]
  check_same_shapes(paths, params)
  cfg = loaded[0][0]
  if dtype is not None:
    cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
    params = [jax.tree.map(lambda x: jnp.asarray(x, dtype), p)
              for p in params]
  return cfg, params


def load_tokenizer(path: str):
  """The tokenizer saved in `path` (params dir or HF dir)."""
  ckpt = _checkpoint_module()
  if ckpt is not None and hasattr(ckpt, 'load_tokenizer'):
    return ckpt.load_tokenizer(path)
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.AutoTokenizer.from_pretrained(path)


def _has_tokenizer(path: str) -> bool:
  return any(os.path.isfile(os.path.join(path, f)) for f in (
      'tokenizer.json', 'tokenizer.model', 'vocab.json'))


def _tok_signature(tok) -> tuple[dict[str, int], dict[str, Any]]:
  specials = {k: getattr(tok, k, None) for k in (
      'bos_token_id', 'eos_token_id', 'pad_token_id', 'unk_token_id')}
  return tok.get_vocab(), specials


def check_tokenizers(tokenizer, tokenizer_path: str, model_paths: Sequence[str],
                     cfg: ModelConfig) -> None:
  """Raises InputError when a model's own tokenizer differs from the one
  used for the probe set, or the tokenizer's ids exceed the vocabulary."""
  vocab, specials = _tok_signature(tokenizer)
  if len(tokenizer) > cfg.vocab_size:
    raise InputError(f'tokenizer {tokenizer_path} has {len(tokenizer)} ids, '
                     f'more than the models\' vocab_size={cfg.vocab_size}')
  for path in model_paths:
    if os.path.abspath(path) == os.path.abspath(tokenizer_path):
      continue
    if not _has_tokenizer(path):
      logging.warning('%s has no tokenizer files; cannot check it against '
                      '%s', path, tokenizer_path)
      continue
    v2, s2 = _tok_signature(load_tokenizer(path))
    if s2 != specials:
      diff = [k for k in specials if specials[k] != s2[k]]
      raise InputError(
          f'tokenizer of {path} differs from the probe tokenizer '
          f'{tokenizer_path}: {diff[0]} = {s2[diff[0]]} vs {specials[diff[0]]}')
    if v2 != vocab:
      diff = sorted(set(v2.items()) ^ set(vocab.items()))
      raise InputError(
          f'tokenizer of {path} differs from the probe tokenizer '
          f'{tokenizer_path}: {len(v2)} vs {len(vocab)} tokens, first '
          f'differing entry {diff[0]!r}')
