"""The embedded miniature reproduction (docs/method.md, "in miniature").

A 4-layer, 128-wide Llama (char tokenizer) is trained from scratch on a
mixture of four synthetic abilities (two-digit addition, two artificial
languages, string reversal); a specialist is continued gently on language A
(it partly forgets addition) and another on reversal. Both are saved as HF
checkpoints (case 'toy'). ACT then recovers addition from the base into
specialist A and merges both specialists into the base, against the
baselines.

Run (the README's main job; ~12 min on 2 idle CPU cores, see BUILD.md):
  python -m act_jax.main --config=configs/demo.py --workdir=/tmp/act_demo
Tests (well under a minute):
  python -m act_jax.main --config=configs/demo.py:tiny --workdir=/tmp/t
  (sizes change many fields, so the size is the config argument after the
  colon.)
"""

import ml_collections

from act_jax.pipeline import jobs

W = '{workdir}/build_models'


def _ability(name: str, metric: str, max_new_tokens: int = 0):
  return jobs.ability(
      probe=f'{W}/data/{name}/probe.jsonl',  # probe records (JSONL)
      eval=f'{W}/data/{name}/eval.jsonl',  # held-out eval records
      sft=f'{W}/data/{name}/sft.jsonl',  # fine-tune records
      metric=metric,  # exact_match | perplexity
      match='exact',  # the whole reply is the answer
      max_new_tokens=max_new_tokens or 32,  # answer characters + EOS
      template='qa',  # prompt + answer
      qa_format='{prompt}{response}',  # toy records have no separators
  )


def get_config(size: str = 'demo') -> ml_collections.ConfigDict:
  """The demo config; `size` is 'demo' or 'tiny' (tests)."""
  if size not in ('demo', 'tiny'):
    raise ValueError(f'configs/demo.py: size {size!r} is not demo or tiny')
  c = jobs.default_config()
  c.mode = 'recover,merge'
  c.case = ml_collections.ConfigDict(dict(
      name='toy',  # act_jax/cases/toy: train the base and specialists
      seed=0,  # init, data and training order seed
      num_layers=4,  # L
      hidden_size=128,  # D
      intermediate_size=384,  # F
      num_heads=4,  # H (head_dim = D / H)
      num_kv_heads=2,  # K (GQA)
      seq_len=64,  # T of packed training rows (tokens)
      batch_size=32,  # rows per training step
      base_steps=800,  # steps of base pretraining on the mixture
      base_lr=3e-3,  # peak lr of base pretraining (AdamW, cosine)
      mixture='arithmetic:0.45,lang_b:0.25,lang_a:0.1,reverse:0.2',
      specialists='spec_lang_a:lang_a,spec_reverse:reverse',  # name:ability
      spec_steps=200,  # continued-training steps per specialist
      spec_lr=3e-4,  # gentle continuation (docs/method.md: lr 3e-4)
      num_probe=256,  # probe records per ability
      num_eval=256,  # eval records per ability
      num_sft=1024,  # SFT records per ability
  ))
  for name in ('base', 'spec_lang_a', 'spec_reverse'):
    c.models[name] = f'{W}/{name}'
  c.abilities.arithmetic = _ability('arithmetic', 'exact_match', 4)
  c.abilities.lang_a = _ability('lang_a', 'perplexity')
  c.abilities.lang_b = _ability('lang_b', 'perplexity')
  c.abilities.reverse = _ability('reverse', 'exact_match', 7)
  c.recover.source = 'base'
  c.recover.target = 'spec_lang_a'
  c.recover.ability = 'arithmetic'
  c.merge.base = 'base'
  c.merge.specialists = 'spec_lang_a:lang_a,spec_reverse:reverse'
  c.collect.max_seq_len = 32
  c.collect.batch_size = 64
  c.localize.top_frac = 0.2  # toy differences are diffuse (docs/method.md)
  c.sweep.extra_rhos = '0.05,0.5'  # the sufficiency curve, transplant only
  c.train.num_steps = 150
  c.train.lr = 1e-3
  c.train.batch_size = 32
  c.train.max_seq_len = 32
  c.train.save_every = 50
  c.train.log_every = 25
  c.sft.num_records = 2048
  c.evaluate.max_seq_len = 48
  c.evaluate.gen_batch_size = 256
  c.report.title = 'ACT demo: the paper setting in miniature'
  c.report.command = ('python -m act_jax.main --config=configs/demo.py '
                      '--workdir=workdir/demo')
  if size == 'tiny':
    c.case.num_layers = 2
    c.case.hidden_size = 32
    c.case.intermediate_size = 64
    c.case.num_heads = 2
    c.case.num_kv_heads = 1
    c.case.batch_size = 8
    c.case.base_steps = 20
    c.case.spec_steps = 10
    c.case.num_probe = 32
    c.case.num_eval = 32
    c.case.num_sft = 64
    c.collect.batch_size = 16
    c.train.num_steps = 4
    c.train.batch_size = 8
    c.train.save_every = 2
    c.sft.num_records = 64
    c.evaluate.num_eval = 32
    c.sweep.extra_rhos = '0.5'
    c.report.bootstrap = 200
    c.report.command = ''
  return c
