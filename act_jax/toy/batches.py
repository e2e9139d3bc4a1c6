"""Records -> fixed-shape token arrays for the toy abilities.

Every record becomes one row `<s> prompt answer </s> <pad>...` of length T
(right padding). `loss_mask_bt` marks the TARGET tokens that are scored
(as in act_jax.losses: position t predicts token t+1, which counts when
`loss_mask_bt[t+1]` is 1): all text (`scope='all'`, pretraining) or the
answer and EOS only (`scope='answer'`, SFT and perplexity of an answer).
"""

from __future__ import annotations

import numpy as np

from act_jax.toy import tokenizer


def encode_records(records: list[dict], seq_len: int, scope: str = 'all'
                  ) -> dict[str, np.ndarray]:
  """Tokenizes records to `tokens_bt`, `attention_mask_bt`, `loss_mask_bt`.

  `loss_mask_bt[b, t] = 1` means token `tokens_bt[b, t]` is a scored target.

  Raises:
    ValueError naming the first record longer than `seq_len`.
  """
  if scope not in ('all', 'answer'):
    raise ValueError(f'scope must be all|answer, got {scope!r}')
  n = len(records)
  tokens = np.zeros((n, seq_len), np.int32)
  attn = np.zeros((n, seq_len), np.int32)
  loss = np.zeros((n, seq_len), np.float32)
  for i, r in enumerate(records):
    p = tokenizer.encode(r['prompt'])
    a = tokenizer.encode(r['answer'])
    ids = [tokenizer.BOS_ID] + p + a + [tokenizer.EOS_ID]
    if len(ids) > seq_len:
      raise ValueError(f'record {i} ({r["text"]!r}) needs {len(ids)} tokens, '
                       f'seq_len is {seq_len}')
    tokens[i, :len(ids)] = ids
    attn[i, :len(ids)] = 1
    first = 1 if scope == 'all' else 1 + len(p)  # first scored target
    loss[i, first:len(ids)] = 1.0
  return {'tokens_bt': tokens, 'attention_mask_bt': attn, 'loss_mask_bt': loss}


def iterate(arrays: dict[str, np.ndarray], batch_size: int, seed: int,
            num_steps: int):
  """Yields `num_steps` shuffled batches (epochs repeat with new orders)."""
  n = len(next(iter(arrays.values())))
  rng = np.random.RandomState(seed)
  order = rng.permutation(n)
  pos = 0
  for _ in range(num_steps):
    if pos + batch_size > n:
      order, pos = rng.permutation(n), 0
    idx = order[pos:pos + batch_size]
    pos += batch_size
    yield {k: v[idx] for k, v in arrays.items()}


def pack_records(records: list[dict], seq_len: int,
                 num_rows: int | None = None) -> dict[str, np.ndarray]:
  """Concatenates `<s> text </s>` examples into rows of `seq_len` tokens.

  For pretraining only (loss on every real token): examples never straddle
  a row boundary, the rest of a row is padding. Returns the same keys as
  `encode_records`.
  """
  rows, cur = [], []
  for r in records:
    ids = [tokenizer.BOS_ID] + tokenizer.encode(r['text']) + [tokenizer.EOS_ID]
    if len(ids) > seq_len:
      raise ValueError(f'record {r["text"]!r} needs {len(ids)} tokens, '
                       f'seq_len is {seq_len}')
    if len(cur) + len(ids) > seq_len:
      rows.append(cur)
      cur = []
      if num_rows is not None and len(rows) == num_rows:
        break
    cur = cur + ids
  if cur and (num_rows is None or len(rows) < num_rows):
    rows.append(cur)
  n = len(rows)
  tokens = np.zeros((n, seq_len), np.int32)
  attn = np.zeros((n, seq_len), np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
    attn[i, :len(row)] = 1
  loss = attn.astype(np.float32)
  loss[:, 0] = 0.0  # nothing predicts a row's first token
  return {'tokens_bt': tokens, 'attention_mask_bt': attn, 'loss_mask_bt': loss}
