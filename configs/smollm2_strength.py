"""Specialization strength: when does activation-guided localization win?

The SmolLM2 recover study (configs/smollm2_recover.py) with the specialist's
length as the config argument, every seeded row on 3 seeds, the eval sets
large enough to decide (322 dev + 322 test QA items: the hand-written set
plus capitals, continents, nationalities and borders from the `countryinfo`
package; 48 + 48 English and conlang paragraphs), three activation scores
(mean_abs_diff, diff_of_mean_abs and the gradient-weighted attribution) and
activation patching of every channel set. Every row is evaluated on both
splits: choose on dev (the main tables), report test. One run per length,
then the cross-run report:

  for n in 50 200 800; do
    python -m act_jax.main --config=configs/smollm2_strength.py:$n \
        --workdir=workdir/strength_$n
  done
  python -m act_jax.pipeline.strength \
      --workdirs=workdir/strength_50,workdir/strength_200,workdir/strength_800 \
      --out=docs/results/smollm2_strength.md

Each run's own report lands in docs/results/smollm2_strength_<n>.md. The
specialists are cached ($ACT_JAX_CACHE) under a digest of their data,
recipe and training code, so each length trains once. `toy` / `toy-<n>`
(every size shrunk, specialist of n steps) is the check of
tests/smollm2_strength_test.py.
"""

import importlib.util
import os

W = '{workdir}/build_models'


def _recover_config():
  """configs/smollm2_recover.py (loaded by path: configs/ is no package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      'smollm2_recover.py')
  spec = importlib.util.spec_from_file_location('smollm2_recover', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _parse(arg: str) -> tuple[bool, int]:
  toy = arg.startswith('toy')
  tail = arg.split('-', 1)[1] if toy and '-' in arg else arg
  if toy and tail == arg:
    return True, 3
  if not tail.isdigit() or int(tail) < 1:
    raise ValueError(f'configs/smollm2_strength.py:{arg}: give the '
                     'specialist\'s steps (e.g. :200) or toy / toy-<steps>')
  return toy, int(tail)


def get_config(arg: str = '50'):
  """The study at a specialist length of `arg` steps ('toy[-n]': tests)."""
  toy, steps = _parse(arg)
  rec = _recover_config()
  c = rec.get_config('toy' if toy else 'study')
  c.case.specialist.num_steps = steps  # the study's axis
  c.case.specialist.save_every = 0 if toy else 100  # resumable, not chatty
  if toy:
    c.case.data = rec.corpus(
        english_eval_paragraphs=4, conlang_eval_paragraphs=4,
        english_dev_paragraphs=4, conlang_dev_paragraphs=4,
        english_probe_paragraphs=4, conlang_train_paragraphs=24,
        stdlib_docstrings=False, qa_eval_frac=0.4, qa_dev_frac=0.3,
        facts='capital,continent', facts_per_kind=6, facts_min_population=0)
  else:
    c.case.data = rec.corpus()  # the recover study's split (322 + 322 QA)
  if toy:  # the study's dev split is configs/smollm2_recover.py's
    d = f'{W}/data_a'
    c.abilities.qa.dev = f'{d}/qa_dev.jsonl'
    c.abilities.english.dev = f'{d}/english_dev.jsonl'
    c.abilities.conlang.dev = f'{d}/conlang_dev.jsonl'
    c.evaluate.split = 'dev,test'  # every row on both; dev the main table
  c.collect.attribution = True  # the attribution score's statistics
  c.sweep.scores = 'mean_abs_diff,diff_of_mean_abs,attribution'
  c.sweep.seeds = '0,1' if toy else '0,1,2'
  c.sweep.patch = 'act,random,weight_diff'
  if toy:
    c.evaluate.max_seq_len = 96  # a char-level chat prompt and its answer
  else:
    c.sweep.rhos = '0.2,0.05,0.01'
    c.sweep.extra_rhos = ''
    c.sweep.finetune_rhos = ''  # +ft rows at every budget
  c.report.title = (f'Specialization strength, {steps}-step specialist: ACT '
                    'on SmolLM2-135M-Instruct')
  c.report.out = '' if toy else f'docs/results/smollm2_strength_{steps}.md'
  c.report.command = ('python -m act_jax.main --config=configs/'
                      f'smollm2_strength.py:{steps} --workdir=workdir/'
                      f'strength_{steps}')
  return c
