"""The toy pretraining rows: records packed into fixed-shape token arrays.

The toy recipe's own data path (its models were trained this way; scoring
and the ACT stages use act_jax.data): `<s> text </s>` examples packed into
rows of T tokens, `loss_mask_bt` on every real token (as in act_jax.losses:
position t predicts token t+1, which counts when `loss_mask_bt[t+1]` is 1).
"""

from __future__ import annotations

import numpy as np

from act_jax.cases.toy import tokenizer


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
