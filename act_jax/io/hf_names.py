"""The explicit table between HF tensor names and act-jax param paths.

HF stores one tensor per layer (`model.layers.{i}.self_attn.q_proj.weight`,
`[d_out, d_in]`); act-jax stores one stacked leaf per module
(`layers.self_attn.q_proj.kernel`, `[L, d_in, d_out]`). The only transform is
a transpose of 2-D weights; norms, biases and embeddings are copied as is.
"""

from __future__ import annotations

import re
from typing import Iterator, NamedTuple

from act_jax.model.config import ModelConfig

_LAYER_RE = re.compile(r'^model\.layers\.(\d+)\.(.+)$')


class Entry(NamedTuple):
  """One HF tensor: its key, our leaf path, layer index (or None), transpose."""
  hf_key: str
  path: tuple[str, ...]
  layer: int | None
  transpose: bool


def _layer_modules(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...], bool]]:
  """(HF suffix, our path below `layers`, transpose) for one decoder layer."""
  out = [('input_layernorm.weight', ('input_layernorm', 'scale'), False),
         ('post_attention_layernorm.weight',
          ('post_attention_layernorm', 'scale'), False)]
  for name, bias in (('q_proj', cfg.qkv_bias), ('k_proj', cfg.qkv_bias),
                     ('v_proj', cfg.qkv_bias), ('o_proj', cfg.o_bias)):
    out.append((f'self_attn.{name}.weight', ('self_attn', name, 'kernel'),
                True))
    if bias:
      out.append((f'self_attn.{name}.bias', ('self_attn', name, 'bias'),
                  False))
  if cfg.qk_norm:
    out += [('self_attn.q_norm.weight', ('self_attn', 'q_norm', 'scale'),
             False),
            ('self_attn.k_norm.weight', ('self_attn', 'k_norm', 'scale'),
             False)]
  for name in ('gate_proj', 'up_proj', 'down_proj'):
    out.append((f'mlp.{name}.weight', ('mlp', name, 'kernel'), True))
    if cfg.mlp_bias:
      out.append((f'mlp.{name}.bias', ('mlp', name, 'bias'), False))
  return out


def hf_entries(cfg: ModelConfig) -> Iterator[Entry]:
  """Every HF tensor a checkpoint of `cfg` must hold, in a stable order."""
  yield Entry('model.embed_tokens.weight', ('embed_tokens', 'embedding'), None,
              False)
  modules = _layer_modules(cfg)
  for i in range(cfg.num_layers):
    for suffix, path, transpose in modules:
      yield Entry(f'model.layers.{i}.{suffix}', ('layers',) + path, i,
                  transpose)
  yield Entry('model.norm.weight', ('norm', 'scale'), None, False)
  if not cfg.tie_word_embeddings:
    yield Entry('lm_head.weight', ('lm_head', 'kernel'), None, True)


def hf_key_table(cfg: ModelConfig) -> dict[str, Entry]:
  """`{hf_key: Entry}` for all expected tensors."""
  return {e.hf_key: e for e in hf_entries(cfg)}


def hf_shape(entry: Entry, leaf_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The HF tensor shape that fills `entry` of a leaf of `leaf_shape`."""
  shape = leaf_shape[1:] if entry.layer is not None else leaf_shape
  return tuple(reversed(shape)) if entry.transpose else tuple(shape)


def optional_hf_keys(cfg: ModelConfig) -> set[str]:
  """HF keys that may be present but carry no information for us."""
  keys = set()
  if cfg.tie_word_embeddings:
    keys.add('lm_head.weight')  # some exports duplicate the tied matrix
  for i in range(cfg.num_layers):
    keys.add(f'model.layers.{i}.self_attn.rotary_emb.inv_freq')
  return keys
