"""Shared test fixtures: tiny random HF checkpoints and a tiny tokenizer.

Everything is built offline with transformers' own classes and
`save_pretrained`, so tests exercise real safetensors files.
"""

from __future__ import annotations

import importlib.util
import json
import os
import string

import numpy as np
import tokenizers
import torch
import transformers

FAMILIES = {
    'llama': transformers.LlamaConfig,
    'mistral': transformers.MistralConfig,
    'qwen2': transformers.Qwen2Config,
    'qwen3': transformers.Qwen3Config,
}

_CHARS = string.ascii_letters + string.digits + string.punctuation + ' \n'
# A minimal chat template: each turn ends with the EOS token, so greedy
# generation stops at the end of the assistant's turn.
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                 "</s>{% endfor %}{% if add_generation_prompt %}<assistant>"
                 "{% endif %}")


def make_tokenizer(out_dir: str | None = None, chat: bool = False
                  ) -> transformers.PreTrainedTokenizerFast:
  """A character-level tokenizer (vocab ~100) with pad/bos/eos/unk tokens;
  with `chat`, also `CHAT_TEMPLATE`."""
  specials = ['<pad>', '<s>', '</s>', '<unk>']
  vocab = {t: i for i, t in enumerate(specials + list(_CHARS))}
  tok = tokenizers.Tokenizer(
      tokenizers.models.WordLevel(vocab=vocab, unk_token='<unk>'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Split('', 'isolated')
  tok.decoder = tokenizers.decoders.Fuse()
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token='<pad>', bos_token='<s>',
      eos_token='</s>', unk_token='<unk>')
  if chat:
    fast.chat_template = CHAT_TEMPLATE
  if out_dir is not None:
    fast.save_pretrained(out_dir)
  return fast


def tiny_hf_config(family: str = 'llama', **overrides):
  """A tiny config of `family`; GQA by default (4 heads, 2 kv heads)."""
  kwargs = dict(vocab_size=len(_CHARS) + 4, hidden_size=64,
                intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=256, initializer_range=0.2,
                tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)
  kwargs.update(overrides)
  return FAMILIES[family](**kwargs)


def make_tiny_hf(out_dir: str, family: str = 'llama', seed: int = 0,
                 dtype: torch.dtype = torch.float32, tokenizer: bool = True,
                 chat: bool = False,
                 **overrides) -> transformers.PreTrainedModel:
  """Saves a random tiny `family` model (+ tokenizer) to `out_dir`."""
  torch.manual_seed(seed)
  cfg = tiny_hf_config(family, **overrides)
  model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
  # Non-trivial norms and biases so a conversion slip cannot hide.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name or name.endswith('bias'):
        p.copy_(torch.randn_like(p) * 0.1 + (1.0 if 'norm' in name else 0.0))
  model = model.to(dtype)
  model.save_pretrained(out_dir)
  if tokenizer:
    make_tokenizer(out_dir, chat=chat)
  return model


def random_tokens(batch: int, length: int, vocab: int,
                  seed: int = 0) -> np.ndarray:
  """Deterministic token ids in [4, vocab) (no special tokens)."""
  return np.random.RandomState(seed).randint(4, vocab, (batch, length))


CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'configs')


def load_config(config_file: str, *args):
  """`get_config(*args)` of `configs/<config_file>`, loaded by path as
  config_flags does (configs/ is no package)."""
  path = os.path.join(CONFIGS_DIR, config_file)
  spec = importlib.util.spec_from_file_location(
      'act_config_' + os.path.splitext(config_file)[0], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(*args)


def toy_case_config(config_file: str, source: str, cache: str):
  """`get_config('toy')` of a SmolLM2 study config with the source
  checkpoint and cache directory set (the SmolLM2 studies at toy size)."""
  c = load_config(config_file, 'toy')
  c.case.source = source
  c.case.cache_dir = cache
  return c


def read_jsonl(path: str) -> list[dict]:
  """Records of a JSONL file (a reference reader for the tests)."""
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]
