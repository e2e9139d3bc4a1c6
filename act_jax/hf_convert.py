"""HF checkpoint directory (config.json + safetensors) <-> act-jax params.

First version: reads every tensor through safetensors' numpy API (no torch)
into the stacked param tree of `forward.abstract_params`. To be hardened:
streaming onto shardings, strict key/shape checks, export.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from safetensors import safe_open

from act_jax import forward, hf_names
from act_jax.model_config import ModelConfig, from_hf_config


class ConversionError(ValueError):
  """A checkpoint that cannot be converted; the message names file and key."""


def load_hf_config(hf_dir: str, dtype: str = 'float32',
                   param_dtype: str = 'float32') -> ModelConfig:
  """ModelConfig from `hf_dir/config.json`."""
  path = os.path.join(hf_dir, 'config.json')
  if not os.path.isfile(path):
    raise ConversionError(f'{path}: missing config.json')
  with open(path) as f:
    return from_hf_config(json.load(f), source=path, dtype=dtype,
                          param_dtype=param_dtype)


def _safetensors_files(hf_dir: str) -> list[str]:
  index = os.path.join(hf_dir, 'model.safetensors.index.json')
  if os.path.isfile(index):
    with open(index) as f:
      names = sorted(set(json.load(f)['weight_map'].values()))
    return [os.path.join(hf_dir, n) for n in names]
  return [os.path.join(hf_dir, 'model.safetensors')]


def load_hf_params(hf_dir: str, cfg: ModelConfig | None = None,
                   **unused: Any) -> tuple[ModelConfig, dict]:
  """Reads an HF directory into `(cfg, params)` (numpy-backed jax arrays)."""
  cfg = cfg or load_hf_config(hf_dir)
  abstract = forward.abstract_params(cfg)
  params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)
  table = hf_names.hf_key_table(cfg)
  for path in _safetensors_files(hf_dir):
    with safe_open(path, framework='numpy') as f:
      for key in f.keys():
        if key not in table:
          continue
        e = table[key]
        leaf = params
        for p in e.path[:-1]:
          leaf = leaf[p]
        t = f.get_tensor(key)
        t = t.T if e.transpose else t
        if e.layer is None:
          leaf[e.path[-1]][...] = t
        else:
          leaf[e.path[-1]][e.layer] = t
  return cfg, jax.tree.map(jax.numpy.asarray, params)
