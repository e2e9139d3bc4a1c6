"""ACT on real weights: merging two SmolLM2-135M language specialists.

Specialist A is the recover study's specialist (configs/smollm2_recover.py:
the same data, training and cache, so it is not trained again), specialist B
the same recipe on a second constructed language (another word-mapping
seed). ACT merges their channels into the source: each specialist's top
channels by activation difference to the source on its own language's
probe text, conflicts resolved by max_score; against random and weight-diff
channels through the same merge and the whole-model baselines. Regenerate
docs/results/smollm2_merge.md:

  python -m act_jax.main --config=configs/smollm2_merge.py \
      --workdir=workdir/smollm2_merge

`get_config('toy')` (with `case.source` set to a tiny random HF dir) is the
quick check of tests/smollm2_merge_test.py.
"""

import importlib.util
import os

import ml_collections

from act_jax.pipeline import jobs

W = '{workdir}/build_models'
COMMAND = ('python -m act_jax.main --config=configs/smollm2_merge.py '
           '--workdir=workdir/smollm2_merge')


def _recover_config():
  """configs/smollm2_recover.py (loaded by path: configs/ is no package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      'smollm2_recover.py')
  spec = importlib.util.spec_from_file_location('smollm2_recover', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def get_config(size: str = 'study') -> ml_collections.ConfigDict:
  """'study' (the real SmolLM2) or 'toy' (every size shrunk, for tests)."""
  if size not in ('study', 'toy'):
    raise ValueError(f'configs/smollm2_merge.py: {size!r} is not study or '
                     'toy')
  rec = _recover_config()
  c = jobs.default_config()
  c.mode = 'merge'
  c.case = rec.case(size, 'a:0,b:1')
  c.models.source = f'{W}/source'
  for lang in ('a', 'b'):
    c.models[f'specialist_{lang}'] = f'{W}/specialist_{lang}'
    c.abilities[f'conlang_{lang}'] = jobs.ability(
        probe=f'{W}/data_{lang}/conlang_probe.jsonl',  # training paragraphs
        eval=f'{W}/data_{lang}/conlang_eval.jsonl',  # held-out paragraphs
        template='text', metric='perplexity')
  c.abilities.english = jobs.ability(
      eval=f'{W}/data_a/english_eval.jsonl', template='text',
      metric='perplexity')
  c.abilities.qa = rec.qa_ability(f'{W}/data_a')
  c.merge.base = 'source'
  c.merge.specialists = 'specialist_a:conlang_a,specialist_b:conlang_b'
  c.localize.top_frac = 0.05
  c.transfer.policy = 'max_score'  # a channel both claim: higher score wins
  c.sweep.rhos = '0.05,0.2'
  c.sweep.finetune = ''  # transplant-merges only
  c.sweep.candidates = 'linear,task_arithmetic,ties,dare'
  c.baselines.ta_lambda = 1.0  # source + (dA + dB)
  rec.study(c, size)
  if size == 'toy':
    c.abilities.qa.max_new_tokens = 4
  c.report.title = 'Merging two SmolLM2-135M specialists: ACT against the ' \
      'baselines'
  c.report.out = 'docs/results/smollm2_merge.md' if size == 'study' else ''
  c.report.command = COMMAND
  return c
