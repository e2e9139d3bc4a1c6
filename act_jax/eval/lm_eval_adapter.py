"""An lm-evaluation-harness model over act-jax's forward and generation.

Optional: needs the `lm_eval` extra (`pip install -e '.[lm_eval]'`). An
exported act-jax result is a plain HF directory, so `lm_eval --model hf
--model_args pretrained=DIR` evaluates it with PyTorch; this adapter runs
the same requests on act-jax's own JAX model instead (CPU, GPU or TPU,
params dirs as well as HF dirs), registered as the lm_eval model `act-jax`:

  python -m act_jax.eval.lm_eval_adapter --model act-jax \\
      --model_args pretrained=export/recover/act_ft --tasks hellaswag

(the module registers the model, then runs lm_eval's own command line).
Requests are encoded exactly as lm_eval's `hf` model encodes them (its
`TemplateLM` splits context and continuation, the tokenizer's own special
tokens, BOS/EOS as the prefix of an empty context), so the two agree on
the same checkpoint:
  loglikelihood          sum log p(continuation | context) and whether
                         greedy decoding yields the continuation
  loglikelihood_rolling  the whole text's log-likelihood in disjoint
                         windows of `max_length` tokens
  generate_until         greedy replies (act-jax's KV-cache decode), cut at
                         the first stop string (EOS included)
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from act_jax.io import models as models_io
from act_jax.model import forward
from act_jax.model import generate
from act_jax.model import losses
from act_jax.model.config import ModelConfig

# pylint: disable=g-import-not-at-top
try:
  # lm_eval registers its own models (lazily) only while its registry is
  # empty: load those placeholders first, so ours does not hide `hf`.
  import lm_eval.models  # pylint: disable=unused-import
  from lm_eval import utils as lm_utils
  from lm_eval.api import model as lm_model
  from lm_eval.api import registry as lm_registry
except ImportError as e:  # the extra is not installed
  raise ImportError(
      "act_jax.eval.lm_eval_adapter needs lm-evaluation-harness: pip "
      "install -e '.[lm_eval]'") from e
# pylint: enable=g-import-not-at-top


@functools.lru_cache(maxsize=8)
def _scorer(cfg: ModelConfig):
  """Jitted `(params, tokens, attn, loss_mask) -> (logprob sum, greedy)`
  per row: the target tokens' summed log-prob and whether every target is
  the argmax."""

  def run(params, tokens_bt, attn_bt, mask_bt):
    logits = forward.apply(params, tokens_bt, cfg,
                           attention_mask_bt=attn_bt).logits
    lp = losses.token_logprobs(logits, tokens_bt)
    w = mask_bt[:, 1:].astype(jnp.float32)
    greedy = jnp.argmax(logits[:, :-1], axis=-1) == tokens_bt[:, 1:]
    return (jnp.sum(lp * w, -1),
            jnp.all(greedy | (w == 0), axis=-1))

  return jax.jit(run)


@lm_registry.register_model('act-jax', 'act_jax')
class ActJaxLM(lm_model.TemplateLM):
  """lm_eval model: a params dir, HF dir or Hub id run by act-jax."""

  def __init__(self, pretrained: str, batch_size: int | str = 8,
               max_length: int | None = None, max_gen_toks: int = 256,
               dtype: str | None = None, **kwargs):
    super().__init__()
    del kwargs  # lm_eval passes device etc.; act-jax uses JAX's devices
    path = models_io.resolve_model(str(pretrained))
    self.cfg, self.params = models_io.load_model(path)
    if dtype:
      self.cfg = self.cfg.replace(dtype=dtype)
    self.tokenizer = models_io.load_tokenizer(path)
    self.stop_ids = models_io.generation_stop_ids(path, self.tokenizer)
    self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
    self.max_length = int(max_length or self.cfg.max_position_embeddings)
    self.max_gen_toks = int(max_gen_toks)
    self._name = path

  # -------------------------------------------------------------- encoding

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_token_id

  @property
  def prefix_token_id(self) -> int:
    bos = self.tokenizer.bos_token_id
    return bos if bos is not None else self.tokenizer.eos_token_id

  @property
  def tokenizer_name(self) -> str:
    return self._name

  def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                 **kwargs) -> list[int]:
    """The tokenizer's ids of `string` (its own special tokens by default,
    none when the string already starts with the prefix token), as lm_eval's
    hf model encodes."""
    del kwargs
    opts = {} if add_special_tokens is None else {
        'add_special_tokens': add_special_tokens}
    prefix = self.tokenizer.decode(self.prefix_token_id)
    if add_special_tokens is None and prefix and string.startswith(prefix):
      opts['add_special_tokens'] = False
    return list(self.tokenizer.encode(string, **opts))

  def apply_chat_template(self, chat_history: list[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    return self.tokenizer.apply_chat_template(
        chat_history, tokenize=False,
        add_generation_prompt=add_generation_prompt)

  # --------------------------------------------------------------- scoring

  def _score(self, pairs: list[tuple[list[int], list[int]]]
            ) -> list[tuple[float, bool]]:
    """(log-likelihood, greedy) of each (context ids, continuation ids),
    the context left-truncated to fit `max_length`."""
    # As lm_eval's hf model: the last max_length + 1 tokens (the model sees
    # max_length of them, the final one is only a target).
    rows = [((list(ctx) + list(cont))[-(self.max_length + 1):], len(cont))
            for ctx, cont in pairs]
    out = []
    fn = _scorer(self.cfg)
    # Rows padded to a power of two (>= 16): few shapes, few compiles.
    for b0 in range(0, len(rows), self.batch_size):
      chunk = rows[b0:b0 + self.batch_size]
      t = max(16, 1 << (max(len(r) for r, _ in chunk) - 1).bit_length())
      b = self.batch_size
      tokens, attn, mask = (np.zeros((b, t), np.int32) for _ in range(3))
      for i, (ids, n) in enumerate(chunk):
        tokens[i, :len(ids)] = ids
        attn[i, :len(ids)] = 1
        mask[i, len(ids) - n:len(ids)] = 1
      lp, greedy = jax.device_get(fn(self.params, tokens, attn, mask))
      out += [(float(lp[i]), bool(greedy[i])) for i in range(len(chunk))]
    return out

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                            **kwargs) -> list[tuple[float, bool]]:
    del disable_tqdm, kwargs
    res = self._score([(ctx, cont) for _, ctx, cont in requests])
    for (key, _, _), r in zip(requests, res):
      self.cache_hook.add_partial('loglikelihood', key, r)
    return res

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False
                           ) -> list[float]:
    """Each text's log-likelihood over disjoint windows of `max_length`."""
    del disable_tqdm
    out = []
    for (string,) in [r.args for r in requests]:
      windows = [lm_utils.make_disjoint_window(w) for w in
                 lm_utils.get_rolling_token_windows(
                     token_list=self.tok_encode(string),
                     prefix_token=self.prefix_token_id,
                     max_seq_len=self.max_length, context_len=1)]
      total = sum(lp for lp, _ in self._score(windows))
      self.cache_hook.add_partial('loglikelihood_rolling', (string,), total)
      out.append(total)
    return out

  def generate_until(self, requests, disable_tqdm: bool = False
                    ) -> list[str]:
    """Greedy replies, cut at the first stop string (EOS included)."""
    del disable_tqdm
    out = []
    eos = self.tokenizer.decode(self.eot_token_id)
    for context, gen_kwargs in [r.args for r in requests]:
      kw = dict(gen_kwargs)
      until = kw.pop('until', None) or []
      until = [until] if isinstance(until, str) else list(until)
      if eos and eos not in until:
        until.append(eos)
      new = int(kw.pop('max_gen_toks', self.max_gen_toks))
      if kw.get('do_sample') or kw.get('temperature', 0.0):
        raise ValueError('act-jax generates greedily only (do_sample=False, '
                         f'temperature=0); got {gen_kwargs}')
      ctx = self.tok_encode(context)[-(self.max_length - new):]
      ids = generate.generate_ids(self.params, self.cfg, [ctx],
                                  max_new_tokens=new, batch_size=1,
                                  stop_ids=self.stop_ids,
                                  pad_id=self.tokenizer.pad_token_id or 0)[0]
      text = self.tokenizer.decode(ids, skip_special_tokens=True)
      for stop in until:
        if stop:
          text = text.split(stop)[0]
      self.cache_hook.add_partial('generate_until', (context, gen_kwargs),
                                  text)
      out.append(text)
    return out


def main(argv: list[str] | None = None) -> None:
  """lm_eval's command line, with the `act-jax` model registered."""
  from lm_eval import __main__ as lm_main  # pylint: disable=g-import-not-at-top
  sys.argv = [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)
  lm_main.cli_evaluate()


if __name__ == '__main__':
  main()
