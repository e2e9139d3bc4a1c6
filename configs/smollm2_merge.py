"""The SmolLM2 merge case: two language specialists merged by ACT.

Specialist A is the recover case's specialist (configs/smollm2_recover.py:
case, the same data, training and cache), specialist B the same recipe on a
second constructed language; act_jax.smollm2.merge_run merges them into the
source by ACT channels, against random and weight-diff channels through the
same merge and the whole-model baselines. Regenerate
docs/results/smollm2_merge.md:

  python -m act_jax.smollm2.merge_run --config=configs/smollm2_merge.py \
      --workdir=workdir/smollm2_merge \
      --config.report.out=docs/results/smollm2_merge.md

`get_config('case_toy')` (with `models.source` set to a tiny random HF dir)
is the quick check of tests/smollm2_merge_test.py.
"""

import importlib.util
import os

import ml_collections

COMMAND = ('python -m act_jax.smollm2.merge_run --config=configs/'
           'smollm2_merge.py --workdir=workdir/smollm2_merge '
           '--config.report.out=docs/results/smollm2_merge.md')


def _recover_case(arg: str) -> ml_collections.ConfigDict:
  path = os.path.join(os.path.dirname(__file__), 'smollm2_recover.py')
  spec = importlib.util.spec_from_file_location('act_smollm2_recover', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.case_config(arg)


def get_config(arg: str = 'case') -> ml_collections.ConfigDict:
  """'case' (real SmolLM2) or 'case_toy' (every size shrunk for tests)."""
  if arg not in ('case', 'case_toy'):
    raise ValueError(f'unknown config argument {arg!r}: expected case or '
                     'case_toy')
  rec = _recover_case(arg)
  c = ml_collections.ConfigDict()
  # Shared with the recover case so specialist A is its (cached) specialist.
  c.cache_dir = rec.cache_dir
  c.models = rec.models
  c.data = rec.data  # language A = data.conlang_seed
  c.eval = rec.eval
  c.specialist = rec.specialist
  c.merge = ml_collections.ConfigDict(dict(
      conlang_b_seed=1,  # word mapping of language B (A: data.conlang_seed)
      probe_paragraphs=64,  # training paragraphs per language probed
      max_seq_len=128,  # probe tokens per row
      batch_size=8,  # probe rows per batch
      score='mean_abs_diff',  # activation score of each specialist
      rhos=(0.05, 0.2),  # per-(layer, site) top fractions per specialist
      policy='max_score',  # channel claimed by both: average | max_score |
                           # priority
      random_seed=0,  # random channels (specialist k: seed + k) / DARE
      lerp_t=0.5,  # linear: (1 - t) A + t B
      ta_lambda=1.0,  # task arithmetic: source + lambda (dA + dB)
      ties_density=0.2,  # TIES: kept fraction of each task vector
      dare_drop=0.9,  # DARE: drop probability (kept deltas rescaled)
  ))
  c.report = ml_collections.ConfigDict(dict(
      out='',  # also write the report here
      keep_replies=8,  # QA replies stored per row in results.json
      command=COMMAND,  # shown in the report
  ))
  if arg == 'case_toy':
    c.merge.probe_paragraphs = 8
    c.merge.max_seq_len = 32
    c.report.keep_replies = 2
  return c
