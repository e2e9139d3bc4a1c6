"""ModelConfig: the one description of a Llama-family decoder, and its HF twin.

Families (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) differ only by fields here,
never by copies of the model code. The config round trip lives here, both
directions in one place (as Levanter's hf_checkpoints.py keeps them):
`from_hf_config` reads a transformers `config.json` dict (transformers 5
keeps RoPE settings under `rope_parameters`; older files use `rope_theta` +
`rope_scaling`, also read) and fails by name on anything that would change
the math we do not implement; `to_hf_config` writes one back and checks that
it reads back as the same ModelConfig.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

SUPPORTED_MODEL_TYPES = ('llama', 'mistral', 'qwen2', 'qwen3')
SUPPORTED_ROPE_TYPES = ('default', 'linear', 'llama3')


class ConfigError(ValueError):
  """A config.json (or a ModelConfig) that act-jax cannot honour."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static description of a decoder; hashable so jit can treat it as static."""

  model_type: str  # one of SUPPORTED_MODEL_TYPES
  vocab_size: int  # V
  hidden_size: int  # D
  intermediate_size: int  # F
  num_layers: int  # L
  num_heads: int  # H
  num_kv_heads: int  # K (H for MHA, 1 for MQA)
  head_dim: int  # E
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_type: str = 'default'  # default | linear | llama3
  rope_factor: float = 1.0  # linear / llama3 scaling factor
  rope_low_freq_factor: float = 1.0  # llama3 only
  rope_high_freq_factor: float = 4.0  # llama3 only
  rope_original_max_positions: int = 8192  # llama3 only
  qkv_bias: bool = False  # bias on q/k/v projections (Qwen2, Llama attention_bias)
  o_bias: bool = False  # bias on o_proj (Llama attention_bias only)
  mlp_bias: bool = False  # bias on gate/up/down (Llama mlp_bias)
  qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
  tie_word_embeddings: bool = False  # lm_head shares embed_tokens
  sliding_windows: tuple[int, ...] = ()  # per layer; 0 = full attention
  max_position_embeddings: int = 4096
  dtype: str = 'float32'  # activation / compute dtype
  param_dtype: str = 'float32'  # dtype params are stored in

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ConfigError(
          f'unsupported model_type {self.model_type!r}; supported: '
          f'{", ".join(SUPPORTED_MODEL_TYPES)}')
    if self.rope_type not in SUPPORTED_ROPE_TYPES:
      raise ConfigError(f'unsupported rope_type {self.rope_type!r}; supported:'
                        f' {", ".join(SUPPORTED_ROPE_TYPES)}')
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f'num_heads={self.num_heads} is not a multiple of '
                        f'num_kv_heads={self.num_kv_heads}')
    if not self.sliding_windows:
      object.__setattr__(self, 'sliding_windows', (0,) * self.num_layers)
    object.__setattr__(self, 'sliding_windows',
                       tuple(int(w) for w in self.sliding_windows))
    if len(self.sliding_windows) != self.num_layers:
      raise ConfigError(f'sliding_windows has {len(self.sliding_windows)} '
                        f'entries for {self.num_layers} layers')

  @property
  def q_dim(self) -> int:
    """Output channels of q_proj (H * E)."""
    return self.num_heads * self.head_dim

  @property
  def kv_dim(self) -> int:
    """Output channels of k_proj and v_proj (K * E)."""
    return self.num_kv_heads * self.head_dim

  def replace(self, **kwargs) -> 'ModelConfig':
    """A copy with some fields changed (e.g. dtype='bfloat16')."""
    return dataclasses.replace(self, **kwargs)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d['sliding_windows'] = list(self.sliding_windows)
    return d

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any], source: str = '<dict>'):
    """Inverse of to_dict; rejects unknown fields by name."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ConfigError(f'{source}: unknown ModelConfig fields {unknown}')
    d = dict(d)
    d['sliding_windows'] = tuple(d.get('sliding_windows', ()))
    return cls(**d)


def _rope_settings(hf: dict[str, Any], source: str) -> dict[str, Any]:
  """RoPE fields from `rope_parameters` (transformers 5) or legacy keys."""
  params = hf.get('rope_parameters')
  if params is None:
    params = dict(hf.get('rope_scaling') or {})
    params.setdefault('rope_theta', hf.get('rope_theta', 10000.0))
  if 'type' in params and 'rope_type' not in params:
    params['rope_type'] = params['type']
  rope_type = params.get('rope_type', 'default')
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise ConfigError(f'{source}: rope_type {rope_type!r} is not supported; '
                      f'supported: {", ".join(SUPPORTED_ROPE_TYPES)}')
  if float(params.get('partial_rotary_factor', 1.0)) != 1.0:
    raise ConfigError(f'{source}: partial_rotary_factor != 1 is not supported')
  out = dict(rope_theta=float(params.get('rope_theta', 10000.0)),
             rope_type=rope_type)
  if rope_type in ('linear', 'llama3'):
    out['rope_factor'] = float(params['factor'])
  if rope_type == 'llama3':
    out['rope_low_freq_factor'] = float(params['low_freq_factor'])
    out['rope_high_freq_factor'] = float(params['high_freq_factor'])
    out['rope_original_max_positions'] = int(
        params['original_max_position_embeddings'])
  return out


def _sliding_windows(hf: dict[str, Any], num_layers: int,
                     source: str) -> tuple[int, ...]:
  """Per-layer attention window (0 = full) from layer_types / sliding_window."""
  window = hf.get('sliding_window')
  layer_types = hf.get('layer_types')
  model_type = hf['model_type']
  if layer_types is not None:
    if len(layer_types) != num_layers:
      raise ConfigError(f'{source}: layer_types has {len(layer_types)} entries '
                        f'for num_hidden_layers={num_layers}')
    out = []
    for i, kind in enumerate(layer_types):
      if kind == 'full_attention':
        out.append(0)
      elif kind == 'sliding_attention':
        if not window:
          raise ConfigError(f'{source}: layer {i} is sliding_attention but '
                            'sliding_window is not set')
        out.append(int(window))
      else:
        raise ConfigError(f'{source}: layer_types[{i}]={kind!r} is not one of '
                          'full_attention, sliding_attention')
    return tuple(out)
  if model_type == 'mistral' and window:
    return (int(window),) * num_layers
  if model_type in ('qwen2', 'qwen3') and hf.get('use_sliding_window') and window:
    first = int(hf.get('max_window_layers', num_layers))
    return tuple(int(window) if i >= first else 0 for i in range(num_layers))
  return (0,) * num_layers


def from_hf_config(hf: dict[str, Any], source: str = 'config.json',
                   dtype: str = 'float32',
                   param_dtype: str = 'float32') -> ModelConfig:
  """Builds a ModelConfig from a parsed HF `config.json`.

  Args:
    hf: the parsed JSON.
    source: path used in error messages.
    dtype: compute dtype for activations.
    param_dtype: storage dtype for params.

  Raises:
    ConfigError naming `source` and the offending field.
  """
  model_type = hf.get('model_type')
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ConfigError(
        f'{source}: unsupported model_type {model_type!r}; supported: '
        f'{", ".join(SUPPORTED_MODEL_TYPES)}')
  required = ('vocab_size', 'hidden_size', 'intermediate_size',
              'num_hidden_layers', 'num_attention_heads')
  missing = [k for k in required if hf.get(k) is None]
  if missing:
    raise ConfigError(f'{source}: missing required fields {missing}')
  act = hf.get('hidden_act', 'silu')
  if act not in ('silu', 'swish'):
    raise ConfigError(f'{source}: hidden_act {act!r} is not supported (silu)')
  heads = int(hf['num_attention_heads'])
  kv_heads = int(hf.get('num_key_value_heads') or heads)
  head_dim = hf.get('head_dim') or hf['hidden_size'] // heads
  num_layers = int(hf['num_hidden_layers'])
  attention_bias = bool(hf.get('attention_bias', False))
  if model_type == 'qwen2':
    qkv_bias, o_bias = True, False
  else:
    qkv_bias = attention_bias and model_type != 'mistral'  # HF: never
    o_bias = attention_bias and model_type in ('llama', 'qwen3')
  return ModelConfig(
      model_type=model_type,
      vocab_size=int(hf['vocab_size']),
      hidden_size=int(hf['hidden_size']),
      intermediate_size=int(hf['intermediate_size']),
      num_layers=num_layers,
      num_heads=heads,
      num_kv_heads=kv_heads,
      head_dim=int(head_dim),
      rms_norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
      qkv_bias=qkv_bias,
      o_bias=o_bias,
      mlp_bias=bool(hf.get('mlp_bias', False)) and model_type == 'llama',
      qk_norm=model_type == 'qwen3',
      tie_word_embeddings=bool(hf.get('tie_word_embeddings', False)),
      sliding_windows=_sliding_windows(hf, num_layers, source),
      max_position_embeddings=int(hf.get('max_position_embeddings', 4096)),
      dtype=dtype,
      param_dtype=param_dtype,
      **_rope_settings(hf, source),
  )


ARCHITECTURES = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
                 'qwen2': 'Qwen2ForCausalLM', 'qwen3': 'Qwen3ForCausalLM'}
# Keys of an old-style config superseded by what we write; `auto_map` and
# the other code references would make transformers run code from the
# source repository, which an exported act-jax model never needs.
_DROPPED_KEYS = ('rope_theta', 'rope_scaling', 'torch_dtype',
                 'quantization_config', 'auto_map', 'custom_pipelines')


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
    raise ConfigError(
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
    raise ConfigError(f'sliding windows {windows}: transformers allows one '
                      'window size per model')
  t = cfg.model_type
  if t == 'llama':
    if sizes:
      raise ConfigError('llama in transformers has no sliding window; '
                        f'cfg has {windows}')
    return {}
  if t == 'mistral':
    if sizes and 0 in windows:
      raise ConfigError(f'mistral needs the same window on every layer, '
                        f'cfg has {windows}')
    return {'sliding_window': sizes[0] if sizes else None}
  kinds = ['sliding_attention' if w else 'full_attention' for w in windows]
  out = {'layer_types': kinds, 'use_sliding_window': bool(sizes),
         'sliding_window': sizes[0] if sizes else None}
  if sizes:
    out['max_window_layers'] = kinds.index('sliding_attention')
  return out


def to_hf_config(cfg: ModelConfig, base: dict[str, Any] | None = None,
                 dtype: str | None = None) -> dict[str, Any]:
  """An HF config.json dict for `cfg`, keeping other fields of `base`.

  Raises:
    ConfigError when transformers cannot express `cfg`, or when the result
    would not read back as `cfg`.
  """
  d = {k: v for k, v in (base or {}).items() if k not in _DROPPED_KEYS}
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
    raise ConfigError(f'exported config.json would not read back as the '
                      f'model config: {diff}')
  return d
