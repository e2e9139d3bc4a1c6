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


if __name__ == '__main__':
  absltest.main()
