"""ACT recover on the real SmolLM2-135M: `act_jax.main` config and the study.

The float32 SmolLM2-135M-Instruct HF directory is built offline by
`act_jax.smollm2.weights.smollm2_hf_dir()` into `$ACT_JAX_CACHE` (default
`~/.cache/act_jax/smollm2-135m-instruct`); that is the default source. The
target is a specialist of it (e.g. continued on text in a new script until
it lost a factual-QA ability), given by flag, as are the ability files
(JSONL records with `prompt` and `answer`):
  python -m act_jax.main --config=configs/smollm2_recover.py \\
    --config.models.target=/path/to/smollm2_specialist \\
    --config.abilities.ability.probe=qa_probe.jsonl (eval, sft likewise) \\
    --config.abilities.retain.probe=script_probe.jsonl (eval, sft) \\
    --workdir=/tmp/smollm2_recover
ACT_METHOD.md: differences on SmolLM2 are diffuse, yet the top 20% of
channels by activation difference restored the ability far better than
random or weight-diff channels, hence `top_frac=0.2` here.

The real-weights study is `get_config('case')`: the specialist is
made here (the source continued, scope full, on a constructed language until
its English QA drops); ACT transplants the source's top channels back, with
and without the compatibility fine-tune, against every baseline at the same
budget, with the four analyses. Regenerate docs/results/smollm2.md (the
SmolLM2 dir and the specialist are cached in $ACT_JAX_CACHE):

  python -m act_jax.smollm2.run --config=configs/smollm2_recover.py:case \
      --workdir=workdir/smollm2 --config.report.out=docs/results/smollm2.md

`get_config('case_toy')` (with `models.source` set to a tiny random HF dir)
is the quick check of tests/smollm2_case_test.py.
"""

import os

import ml_collections


def get_config(arg: str = ''):
  """SmolLM2-135M recover config (CPU-sized batches); 'case' / 'case_toy':
  the act_jax.smollm2.run study (see the module docstring)."""
  if arg:
    return case_config(arg)
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(__file__), 'recover.py')
  spec = importlib.util.spec_from_file_location('act_recover_config', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  cache = os.environ.get('ACT_JAX_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'act_jax')
  c.models.source = os.path.join(cache, 'smollm2-135m-instruct')
  c.localize.top_frac = 0.2
  c.collect.batch_size = 8
  c.collect.max_seq_len = 128
  c.train.batch_size = 8
  c.train.max_seq_len = 128
  c.train.num_steps = 100
  c.train.lr = 1e-5
  c.evaluate.batch_size = 8
  c.evaluate.num_eval = 100
  return c


COMMAND = ('python -m act_jax.smollm2.run --config=configs/smollm2_recover.py'
           ':case --workdir=workdir/smollm2 --config.report.out=docs/results/'
           'smollm2.md')


def _train(**kw) -> ml_collections.ConfigDict:
  base = dict(
      num_steps=100,  # optimizer steps
      lr=1e-4,  # peak AdamW lr, per step
      warmup_frac=0.05,  # fraction of steps of linear warmup
      schedule='cosine',  # decay after warmup
      weight_decay=0.0,  # decoupled AdamW weight decay
      clip_norm=1.0,  # global gradient-norm clip
      grad_accum=1,  # micro-batches per step
      batch_size=8,  # sequences per step
      max_seq_len=128,  # tokens per sequence
      overlength='error',  # batches are built to fit
      scope='full',  # full | channels | modules
      lean=False,  # channels scope: Adam state only for selected slices
      save_every=50,  # checkpoint interval (steps); resumable
      keep_checkpoints=1,  # checkpoints kept
      seed=0,  # rng / data-order seed
      log_every=10,  # console progress interval (steps)
      compute_dtype='float32',  # forward dtype
      b1=0.9, b2=0.999, eps=1e-8)  # Adam moments
  base.update(kw)
  return ml_collections.ConfigDict(base)


def case_config(arg: str = 'case') -> ml_collections.ConfigDict:
  """The full SmolLM2 case (act_jax.smollm2.run); 'case_toy' shrinks every
  size for tests."""
  c = ml_collections.ConfigDict()
  c.cache_dir = ''  # '' = $ACT_JAX_CACHE or ~/.cache/act_jax
  c.models = ml_collections.ConfigDict()
  c.models.source = ''  # '' = SmolLM2-135M-Instruct built into the cache

  c.data = ml_collections.ConfigDict(dict(
      seed=0,  # split seed (paragraph buckets, QA halves)
      conlang_seed=0,  # word -> conlang-word mapping seed
      english_eval_paragraphs=32,  # held-out English texts
      conlang_eval_paragraphs=32,  # held-out conlang texts
      english_probe_paragraphs=64,  # English prose in the probe set
      conlang_train_paragraphs=0,  # 0 = every remaining paragraph
      qa_eval_frac=0.5,  # share of each QA category held out
      stdlib_docstrings=True,  # stdlib docstrings as extra prose
  ))
  c.eval = ml_collections.ConfigDict(dict(
      max_seq_len=128,  # tokens per perplexity text
      batch_size=16,  # perplexity batch rows
      max_new_tokens=12,  # greedy tokens per QA reply
      qa_limit=0,  # first N eval questions (0 = all)
  ))
  # The specialist: continued training on conlang text, every param.
  c.specialist = _train(num_steps=50, lr=2e-4, save_every=10)

  c.localize = ml_collections.ConfigDict(dict(
      scores=('mean_abs_diff', 'diff_of_mean_abs'),  # activation scores
      rhos=(0.2, 0.05, 0.01),  # per-(layer, site) top fractions (run order)
      curve_extra_rhos=(0.5,),  # extra sufficiency points (no fine-tune)
      max_seq_len=128,  # probe tokens per row
      batch_size=8,  # probe rows per batch
  ))
  # Compatibility fine-tune (scope channels) and the full-FT baseline.
  c.compat = ml_collections.ConfigDict()
  c.compat.enabled = True  # also run every ACT variant + ft
  c.compat.rhos = ()  # rhos whose ACT variants get it; () = every rho
  c.compat.qa_weight = 0.5  # share of fine-tune tokens that are English QA
  c.compat.train = _train(num_steps=16, lr=5e-5, scope='channels',
                          save_every=0)

  c.baselines = ml_collections.ConfigDict(dict(
      random_seed=0,  # random channels / DARE seed
      random_ft_rhos=(0.05,),  # random channels + the same fine-tune
      lerp_t=0.5,  # linear interpolation weight of the source
      ta_lambda=0.5,  # task arithmetic: source + lambda (specialist - source)
      ties_density=0.2,  # TIES: kept fraction of the specialist's deltas
      dare_drop=0.9,  # DARE: drop probability (kept deltas rescaled)
  ))
  c.report = ml_collections.ConfigDict(dict(
      out='',  # also write the report here (e.g. docs/results/smollm2.md)
      plots=True,  # sufficiency / concentration PNGs
      keep_replies=83,  # QA replies stored per variant in results.json
      command=COMMAND,  # shown in the report
  ))

  if arg == 'case_toy':
    c.data.english_eval_paragraphs = 4
    c.data.conlang_eval_paragraphs = 4
    c.data.english_probe_paragraphs = 4
    c.data.conlang_train_paragraphs = 24
    c.data.stdlib_docstrings = False
    c.eval.max_seq_len = 32
    c.eval.batch_size = 8
    c.eval.max_new_tokens = 4
    c.eval.qa_limit = 8
    c.specialist = _train(num_steps=3, lr=1e-2, batch_size=8, max_seq_len=32,
                          save_every=0, log_every=1)
    c.localize.rhos = (0.05, 0.2)
    c.localize.curve_extra_rhos = ()
    c.compat.rhos = (0.05,)
    c.localize.max_seq_len = 32
    c.localize.batch_size = 8
    c.compat.train = _train(num_steps=2, lr=1e-3, scope='channels',
                            batch_size=8, max_seq_len=32, save_every=0,
                            log_every=1)
    c.report.plots = False
    c.report.keep_replies = 2
  elif arg != 'case':
    raise ValueError(f'unknown config argument {arg!r}: expected case or '
                     'case_toy')
  return c
