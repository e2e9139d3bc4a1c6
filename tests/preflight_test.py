"""Bad configurations fail by name before any heavy work."""

import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
import ml_collections

import testutil
from act_jax.cases.toy import tokenizer as toy_tokenizer
from act_jax.io import models as models_io
from act_jax.pipeline import jobs
from act_jax.pipeline import preflight
from act_jax.pipeline import run as run_lib
from act_jax.pipeline import runner


def check(config):
  """Pre-flight of a config, as `act_jax.main` does it."""
  preflight.check_plan(jobs.plan_from_config(config, '/tmp/unused'))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(path, *args):
  """Loads a config file like config_flags does (with `:arg`)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('cfg', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(*args)


def _recover(source, target, data):
  c = _config(os.path.join(REPO, 'configs', 'recover.py'))
  c.models.source, c.models.target = source, target
  for a in ('ability', 'retain'):
    for f in ('probe', 'eval', 'sft'):
      c.abilities[a][f] = data
  return c


class PreflightTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()
    self.data = os.path.join(self.tmp, 'd.jsonl')
    with open(self.data, 'w') as f:
      f.write('{"prompt": "1+1=", "answer": "2", "text": "1+1=2"}\n')

  def test_unknown_key_is_rejected_by_the_cli(self):
    p = subprocess.run(
        [sys.executable, '-m', 'act_jax.main',
         f'--config={REPO}/configs/demo.py:tiny', '--workdir=' + self.tmp,
         '--config.localize.no_such_key=1'], cwd=REPO, capture_output=True,
        text=True, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS='cpu'))
    self.assertNotEqual(p.returncode, 0)
    self.assertIn('no_such_key', p.stderr)
    self.assertEqual(os.listdir(self.tmp), ['d.jsonl'])  # nothing ran

  def test_bad_values_name_the_flag(self):
    for field, value, flag in (
        ('score', 'bogus', 'localize.score'),
        ('top_frac', 1.5, 'localize.top_frac'),
        ('unit', 'layer', 'localize.unit')):
      c = _config(os.path.join(REPO, 'configs', 'demo.py'), 'tiny')
      c.localize[field] = value
      with self.assertRaisesRegex(preflight.PreflightError, flag):
        check(c)
    c = _config(os.path.join(REPO, 'configs', 'demo.py'), 'tiny')
    c.mode = 'recover,fly'
    with self.assertRaisesRegex(jobs.ConfigError, 'config.mode'):
      check(c)
    c = _config(os.path.join(REPO, 'configs', 'demo.py'), 'tiny')
    c.recover.target = 'nobody'
    with self.assertRaisesRegex(preflight.PreflightError, "'nobody'"):
      check(c)
    c = _config(os.path.join(REPO, 'configs', 'demo.py'), 'tiny')
    c.train.batch_size, c.train.grad_accum = 6, 4
    with self.assertRaisesRegex(preflight.PreflightError, 'grad_accum'):
      check(c)

  def test_missing_checkpoint_directory(self):
    src = os.path.join(self.tmp, 'src')
    testutil.make_tiny_hf(src, seed=0)
    missing = os.path.join(self.tmp, 'nope')
    work = os.path.join(self.tmp, 'work')
    with self.assertRaisesRegex(preflight.PreflightError,
                                f'missing checkpoint directory {missing}'):
      run_lib.run_pipeline(_recover(src, missing, self.data), work)
    self.assertFalse(os.path.exists(os.path.join(work, 'convert')))

  def test_models_must_share_architecture(self):
    a, b = os.path.join(self.tmp, 'a'), os.path.join(self.tmp, 'b')
    testutil.make_tiny_hf(a, seed=0)
    testutil.make_tiny_hf(b, seed=1, intermediate_size=128)
    with self.assertRaisesRegex(preflight.PreflightError,
                                'do not share an architecture.*'
                                'intermediate_size'):
      run_lib.run_pipeline(_recover(a, b, self.data), os.path.join(self.tmp, 'w'))

  def test_models_must_share_tokenizer(self):
    a, b = os.path.join(self.tmp, 'a'), os.path.join(self.tmp, 'b')
    testutil.make_tiny_hf(a, seed=0)
    testutil.make_tiny_hf(b, seed=1, tokenizer=False)
    toy_tokenizer.make_tokenizer(b)  # same vocab size class, other ids
    with self.assertRaisesRegex(models_io.ModelDirError,
                                'do not share a tokenizer'):
      models_io.check_related({'a': a, 'b': b})

  def test_stage_with_missing_inputs(self):
    c = _config(os.path.join(REPO, 'configs', 'demo.py'), 'tiny')
    c.stages = 'localize'
    work = os.path.join(self.tmp, 'w')
    with self.assertRaisesRegex(runner.StageError,
                                r'localize needs .*/convert/ .*\n.*'
                                r'localize needs .*/collect/'):
      run_lib.run_pipeline(c, work)
    self.assertEqual(os.listdir(work) if os.path.exists(work) else [], [])

  def test_unknown_stage_name(self):
    c = _config(os.path.join(REPO, 'configs', 'demo.py'), 'tiny')
    c.stages = 'collect,polish'
    with self.assertRaisesRegex(runner.StageError, "unknown stages.*polish"):
      run_lib.run_pipeline(c, os.path.join(self.tmp, 'w'))


def _set(c, key, value):
  """`c.a.b.c = value` for the dotted `key`."""
  *path, last = key.split('.')
  for p in path:
    c = c[p]
  c[last] = value


class UserConfigTest(absltest.TestCase):
  """Each bad setting of a user's own run fails in pre-flight with one line
  naming the field (and the allowed values), before any heavy work."""

  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()
    self.qa = os.path.join(self.tmp, 'qa.jsonl')
    self.text = os.path.join(self.tmp, 'text.jsonl')
    with open(self.qa, 'w') as f:
      f.write('{"prompt": "2+2?", "answer": "4"}\n')
    with open(self.text, 'w') as f:
      f.write('{"text": "Some English."}\n')

  def _config(self):
    c = _config(os.path.join(REPO, 'configs', 'recover.py'))
    c.models.source, c.models.target = '/ckpt/src', '/ckpt/tgt'
    for f in ('probe', 'eval', 'sft'):
      c.abilities.ability[f] = self.qa
    c.abilities.retain.eval = self.text  # evaluated only: no probe, no SFT
    return c

  def _plan(self, c=None):
    return jobs.plan_from_config(c or self._config(), self.tmp)

  def _fails(self, pattern, key=None, value=None, what=preflight.check_plan):
    c = self._config()
    if key:
      _set(c, key, value)
    with self.assertRaisesRegex(preflight.PreflightError, pattern) as e:
      what(self._plan(c))
    self.assertNotIn('\n', str(e.exception))
    return str(e.exception)

  def test_an_eval_only_ability_needs_only_its_eval_file(self):
    plan = self._plan()
    preflight.check_plan(plan)
    preflight.check_data(plan)
    self.assertEqual(plan.jobs[0].abilities, ('ability', 'retain'))

  def test_unknown_choices_name_the_field_and_the_allowed_values(self):
    for key, value, pattern in (
        ('abilities.ability.metric', 'accuracy',
         r'abilities\.ability\.metric=.accuracy.: expected one of '
         r'perplexity, exact_match'),
        ('abilities.retain.template', 'markdown',
         r'abilities\.retain\.template=.markdown.: expected one of text, '
         r'qa, chat'),
        ('abilities.ability.match', 'fuzzy',
         r'abilities\.ability\.match=.fuzzy.: expected one of exact, '
         r'contains, regex, last_number, hash'),
        # A perplexity ability's match is checked too: never ignored.
        ('abilities.retain.match', 'fuzzy', r'abilities\.retain\.match'),
        ('abilities.ability.overflow', 'wrap',
         r'abilities\.ability\.overflow=.wrap.: expected one of truncate, '
         'chunk, error'),
        ('localize.score', 'weight_diff',
         r'localize\.score=.weight_diff.: expected one of mean_abs_diff'),
        ('localize.select', 'top_k',
         r'localize\.select=.top_k.: expected one of per_site, global, '
         'threshold, mass'),
        ('localize.select', 'threshold',
         r'localize\.threshold=0\.0: select=threshold needs a score '
         'threshold > 0'),
        ('export.dtype', 'int8', r'export\.dtype=.int8.: expected one of'),
        ('abilities.ability.pattern', '(',
         r'abilities\.ability\.pattern=.\(.: not a regular expression'),
        ('abilities.ability.contains_tokens', 8,
         r'abilities\.ability\.contains_tokens=8: a token window is '
         'searched only by match=contains')):
      with self.subTest(key=key, value=value):
        self._fails(pattern, key, value)

  def test_mass_selection_fails_on_a_bad_share(self):
    c = self._config()
    c.localize.select, c.localize.mass = 'mass', 1.5
    with self.assertRaisesRegex(preflight.PreflightError, 'localize.mass'):
      preflight.check_plan(self._plan(c))

  def test_missing_field_in_any_record_of_every_data_file(self):
    csv = os.path.join(self.tmp, 'qa.csv')
    with open(csv, 'w') as f:
      f.write('question,answer\n2+2?,4\n')
    for use in ('probe', 'eval', 'sft'):
      for path in (self.text, csv):
        with self.subTest(use=use, path=path):
          msg = self._fails(
              f"abilities.ability.{use}\\): record 1 has no field "
              "'prompt'", f'abilities.ability.{use}', path,
              preflight.check_data)
          self.assertStartsWith(msg, path)
    self._fails(r"abilities.retain.eval\): record 1 has no field "
                "'text'", 'abilities.retain.eval', self.qa,
                preflight.check_data)
    self._fails('abilities.ability.sft: no such file', 'abilities.ability.sft',
                os.path.join(self.tmp, 'nope.jsonl'), preflight.check_data)

  def test_a_saved_dataset_directory_is_a_data_source(self):
    import datasets  # pylint: disable=g-import-not-at-top
    saved = os.path.join(self.tmp, 'saved')
    datasets.Dataset.from_list([{'prompt': '1+1?', 'answer': '2'}]
                               ).save_to_disk(saved)
    c = self._config()
    c.abilities.ability.eval = saved
    preflight.check_data(self._plan(c))
    c.abilities.retain.eval = saved  # no 'text' field
    with self.assertRaisesRegex(preflight.PreflightError, "no field 'text'"):
      preflight.check_data(self._plan(c))

  def test_chat_template_needs_a_tokenizer_with_one(self):
    a, b = os.path.join(self.tmp, 'a'), os.path.join(self.tmp, 'b')
    testutil.make_tiny_hf(a, seed=0)
    testutil.make_tiny_hf(b, seed=1)
    c = self._config()
    c.models.source, c.models.target = a, b
    c.abilities.ability.template = 'chat'
    with self.assertRaisesRegex(preflight.PreflightError,
                                'abilities.ability.template=chat: the '
                                'tokenizer of target .* has no chat '
                                'template'):
      preflight.check_models(self._plan(c))
    for d in (a, b):
      testutil.make_tokenizer(d, chat=True)
    preflight.check_models(self._plan(c))


if __name__ == '__main__':
  absltest.main()
