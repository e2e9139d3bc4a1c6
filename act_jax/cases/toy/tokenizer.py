"""A character-level HF tokenizer for the toy abilities.

Built with `tokenizers` (WordLevel over single characters) and wrapped in a
`PreTrainedTokenizerFast`, so it saves and loads like any HF tokenizer and
travels inside every toy checkpoint directory.
"""

from __future__ import annotations

import string

import tokenizers
import transformers

SPECIALS = ('<pad>', '<s>', '</s>', '<unk>')
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
CHARS = (string.digits + string.ascii_lowercase + string.ascii_uppercase +
         '+=>.,;:!? ')


def vocab() -> dict[str, int]:
  """Token -> id: the four specials, then one id per character."""
  return {t: i for i, t in enumerate(list(SPECIALS) + list(CHARS))}


def vocab_size() -> int:
  """Number of ids (specials + characters)."""
  return len(SPECIALS) + len(CHARS)


def make_tokenizer(out_dir: str | None = None
                  ) -> transformers.PreTrainedTokenizerFast:
  """The char-level tokenizer; saved to `out_dir` when given."""
  tok = tokenizers.Tokenizer(
      tokenizers.models.WordLevel(vocab=vocab(), unk_token='<unk>'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Split('', 'isolated')
  tok.decoder = tokenizers.decoders.Fuse()
  # Every encoded text starts with <s>, as the toy models were trained.
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single='<s> $A', pair='<s> $A $B', special_tokens=[('<s>', BOS_ID)])
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token='<pad>', bos_token='<s>',
      eos_token='</s>', unk_token='<unk>')
  if out_dir is not None:
    fast.save_pretrained(out_dir)
  return fast


_IDS = None


def encode(text: str) -> list[int]:
  """Character ids of `text` (no specials); fast path without HF overhead."""
  global _IDS
  if _IDS is None:
    _IDS = vocab()
  return [_IDS.get(ch, UNK_ID) for ch in text]


def decode(ids) -> str:
  """Inverse of `encode`; stops at the first EOS, drops other specials."""
  inv = {i: t for t, i in vocab().items()}
  out = []
  for i in ids:
    i = int(i)
    if i == EOS_ID:
      break
    if i >= len(SPECIALS):
      out.append(inv[i])
  return ''.join(out)
