"""act-jax params -> an HF checkpoint directory transformers can load.

`save_hf` writes sharded safetensors (`model-00001-of-0000N.safetensors` +
`model.safetensors.index.json`, or one `model.safetensors`), a `config.json`
rebuilt from the ModelConfig (on top of the source config.json when one is
given, so token ids, chat settings etc. survive), tokenizer files and a short
README.md model card, all into a temporary sibling renamed into place at the
end. It streams: one leaf and one shard on the host at a time.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any

from absl import logging
import jax
import numpy as np
from safetensors.numpy import save_file

from act_jax import checkpoint, forward, hf_names
from act_jax.hf_convert import INDEX_FILE, SINGLE_FILE, ConversionError
from act_jax.model_config import ModelConfig, from_hf_config

ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
                 'qwen2': 'Qwen2ForCausalLM', 'qwen3': 'Qwen3ForCausalLM'}
# Keys of an old-style config superseded by what we write.
_LEGACY_KEYS = ('rope_theta', 'rope_scaling', 'torch_dtype',
                'quantization_config')


def _rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
  rope = {'rope_type': cfg.rope_type, 'rope_theta': cfg.rope_theta}
  if cfg.rope_type in ('linear', 'llama3'):
    rope['factor'] = cfg.rope_factor
  if cfg.rope_type == 'llama3':
    rope.update(low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=(
                    cfg.rope_original_max_positions))
  return rope


def _bias_fields(cfg: ModelConfig) -> dict[str, Any]:
  """attention_bias / mlp_bias, or an error when HF cannot express cfg."""
  t = cfg.model_type
  ok = {'llama': cfg.qkv_bias == cfg.o_bias and not cfg.qk_norm,
        'qwen3': cfg.qkv_bias == cfg.o_bias and cfg.qk_norm,
        'qwen2': cfg.qkv_bias and not cfg.o_bias and not cfg.qk_norm,
        'mistral': not (cfg.qkv_bias or cfg.o_bias or cfg.qk_norm)}[t]
  if not ok or (cfg.mlp_bias and t != 'llama'):
    raise ConversionError(
        f'{t} in transformers cannot express qkv_bias={cfg.qkv_bias} '
        f'o_bias={cfg.o_bias} mlp_bias={cfg.mlp_bias} qk_norm={cfg.qk_norm}')
  out = {}
  if t in ('llama', 'qwen3'):
    out['attention_bias'] = cfg.qkv_bias
  if t == 'llama':
    out['mlp_bias'] = cfg.mlp_bias
  return out


def _window_fields(cfg: ModelConfig) -> dict[str, Any]:
  """sliding_window / layer_types for the family, or an error."""
  windows = cfg.sliding_windows
  sizes = sorted({w for w in windows if w})
  if len(sizes) > 1:
    raise ConversionError(f'sliding windows {windows}: transformers allows one '
                          'window size per model')
  t = cfg.model_type
  if t == 'llama':
    if sizes:
      raise ConversionError('llama in transformers has no sliding window; '
                            f'cfg has {windows}')
    return {}
  if t == 'mistral':
    if sizes and 0 in windows:
      raise ConversionError(f'mistral needs the same window on every layer, '
                            f'cfg has {windows}')
    return {'sliding_window': sizes[0] if sizes else None}
  kinds = ['sliding_attention' if w else 'full_attention' for w in windows]
  out = {'layer_types': kinds, 'use_sliding_window': bool(sizes),
         'sliding_window': sizes[0] if sizes else None}
  if sizes:
    out['max_window_layers'] = kinds.index('sliding_attention')
  return out


def hf_config_dict(cfg: ModelConfig, base: dict[str, Any] | None = None,
                   dtype: str | None = None) -> dict[str, Any]:
  """An HF config.json dict for `cfg`, keeping other fields of `base`.

  Raises:
    ConversionError when transformers cannot express `cfg`, or when the
    result would not read back as `cfg`.
  """
  d = {k: v for k, v in (base or {}).items() if k not in _LEGACY_KEYS}
  d.update(
      model_type=cfg.model_type,
      architectures=[ARCHITECTURES[cfg.model_type]],
      vocab_size=cfg.vocab_size,
      hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim,
      rms_norm_eps=cfg.rms_norm_eps,
      max_position_embeddings=cfg.max_position_embeddings,
      tie_word_embeddings=cfg.tie_word_embeddings,
      rope_parameters=_rope_parameters(cfg),
      dtype=dtype or cfg.param_dtype,
  )
  if d.get('hidden_act') not in ('silu', 'swish'):
    d['hidden_act'] = 'silu'
  d.update(_bias_fields(cfg))
  d.update(_window_fields(cfg))
  back = from_hf_config(d, source='exported config.json', dtype=cfg.dtype,
                        param_dtype=cfg.param_dtype)
  if back != cfg:
    diff = {f: (getattr(cfg, f), getattr(back, f)) for f in cfg.to_dict()
            if getattr(cfg, f) != getattr(back, f)}
    raise ConversionError(f'exported config.json would not read back as the '
                          f'model config: {diff}')
  return d


def _host(x: Any) -> np.ndarray:
  if hasattr(x, 'is_fully_addressable') and not x.is_fully_addressable:
    raise ConversionError('save_hf needs fully addressable params (gather '
                          'them to one process first)')
  return np.asarray(jax.device_get(x))


def _write_shards(params: dict[str, Any], cfg: ModelConfig, out_dir: str,
                  max_shard_bytes: int
                  ) -> tuple[list[str], dict[str, str], int]:
  """Writes tensors shard by shard; returns names, `{key: file}`, bytes."""
  by_path = collections.OrderedDict()
  for e in hf_names.hf_entries(cfg):
    by_path.setdefault(e.path, []).append(e)
  shards, current, size, total = [], {}, 0, 0

  def flush():
    nonlocal current, size
    if current:
      name = f'.shard-{len(shards):05d}.safetensors'
      save_file(current, os.path.join(out_dir, name),
                metadata={'format': 'pt'})
      shards.append((name, list(current)))
      current, size = {}, 0

  for path, entries in by_path.items():
    leaf = params
    for p in path:
      leaf = leaf[p]
    host = _host(leaf)
    for e in entries:
      t = host[e.layer] if e.layer is not None else host
      t = np.ascontiguousarray(t.T if e.transpose else t)
      if current and size + t.nbytes > max_shard_bytes:
        flush()
      current[e.hf_key] = t
      size += t.nbytes
      total += t.nbytes
    del host
  flush()
  n = len(shards)
  names, key_file = [], {}
  for i, (tmp_name, keys) in enumerate(shards, start=1):
    name = SINGLE_FILE if n == 1 else f'model-{i:05d}-of-{n:05d}.safetensors'
    os.rename(os.path.join(out_dir, tmp_name), os.path.join(out_dir, name))
    names.append(name)
    key_file.update({k: name for k in keys})
  return names, key_file, total


def _model_card(cfg: ModelConfig, n_params: int, dtype: str) -> str:
  return (f'# {cfg.model_type} model exported by act-jax\n\n'
          f'- architecture: {ARCHITECTURES[cfg.model_type]}\n'
          f'- parameters: {n_params:,} ({dtype})\n'
          f'- layers {cfg.num_layers}, hidden {cfg.hidden_size}, heads '
          f'{cfg.num_heads} (kv {cfg.num_kv_heads}), vocab {cfg.vocab_size}\n'
          '\nLoad with `transformers.AutoModelForCausalLM.from_pretrained`.\n')


def save_hf(params: dict[str, Any], cfg: ModelConfig, out_dir: str, *,
            hf_config: dict[str, Any] | None = None,
            tokenizer_dir: str | None = None, model_card: str | None = None,
            max_shard_bytes: int = 2**30, overwrite: bool = False) -> None:
  """Writes `params` as an HF checkpoint directory, atomically.

  Args:
    params: the param tree of `cfg` (all leaves one dtype, written as is).
    cfg: its ModelConfig.
    out_dir: output directory; must not exist unless `overwrite`.
    hf_config: the source config.json dict, whose other fields are kept.
    tokenizer_dir: copy tokenizer / generation config files from here.
    model_card: README.md text; default a short generated card.
    max_shard_bytes: start a new shard before exceeding this size.
    overwrite: replace an existing `out_dir`.

  Raises:
    ConversionError / CheckpointError naming what does not match, before
    anything is written.
  """
  dtypes = {np.dtype(x.dtype).name for x in jax.tree.leaves(params)}
  if len(dtypes) != 1:
    raise ConversionError(f'params mix dtypes {sorted(dtypes)}; cast first')
  dtype = dtypes.pop()
  cfg = cfg.replace(param_dtype=dtype)
  checkpoint.check_tree(params, forward.abstract_params(cfg), 'save_hf params')
  config = hf_config_dict(cfg, hf_config, dtype)
  with checkpoint.atomic_dir(out_dir, overwrite) as tmp:
    names, key_file, total = _write_shards(params, cfg, tmp, max_shard_bytes)
    if len(names) > 1:
      with open(os.path.join(tmp, INDEX_FILE), 'w') as f:
        json.dump({'metadata': {'total_size': total},
                   'weight_map': dict(sorted(key_file.items()))}, f, indent=2)
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
      json.dump(config, f, indent=2, sort_keys=True)
    checkpoint.copy_aux_files(tokenizer_dir, tmp)
    with open(os.path.join(tmp, 'README.md'), 'w') as f:
      f.write(model_card if model_card is not None else _model_card(
          cfg, forward.count_params(params), dtype))
  logging.info('saved HF checkpoint (%d files, %s) to %s', len(names), dtype,
               out_dir)
