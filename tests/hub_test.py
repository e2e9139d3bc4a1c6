"""Hub ids as models, offline: a cached snapshot is used, a missing one is
one line saying what to download (the tests never reach the network:
conftest sets HF_HUB_OFFLINE=1)."""

import os
import shutil
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
from huggingface_hub import constants as hub_constants

from act_jax.io import models as models_io
from act_jax.pipeline import preflight
from act_jax.pipeline import run as run_lib
import testutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT = 'a' * 40


def fake_hub_cache(cache: str, repo: str, model_dir: str) -> str:
  """huggingface_hub's cache layout holding `model_dir` as `repo`'s main."""
  root = os.path.join(cache, 'models--' + repo.replace('/', '--'))
  snap = os.path.join(root, 'snapshots', COMMIT)
  shutil.copytree(model_dir, snap)
  os.makedirs(os.path.join(root, 'refs'))
  with open(os.path.join(root, 'refs', 'main'), 'w') as f:
    f.write(COMMIT)
  return snap


class HubTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp()

  def test_paths_and_ids(self):
    for path in ('/ckpt/a', './a/b', '~/x/y', 'relative/path/deeper',
                 self.tmp):
      self.assertFalse(models_io.is_hub_id(path), path)
      self.assertEqual(models_io.resolve_model(path), path)
    for spec in ('HuggingFaceTB/SmolLM2-135M-Instruct', 'org/name@v1.0',
                 'Qwen/Qwen2.5-7B'):
      self.assertTrue(models_io.is_hub_id(spec), spec)

  def test_offline_missing_id_is_one_line_saying_what_to_download(self):
    with self.assertRaises(models_io.ModelDirError) as e:
      models_io.resolve_model('someorg/not-cached@v2')
    msg = str(e.exception)
    self.assertNotIn('\n', msg)
    self.assertStartsWith(msg, 'someorg/not-cached@v2: not a local '
                          'directory, and the Hub model could not be fetched')
    self.assertIn("hf download someorg/not-cached --revision v2 --include "
                  "'*.safetensors' '*.json' 'tokenizer.model' '*.txt' "
                  "'*.jinja' --local-dir DIR` and pass DIR", msg)

  def test_cached_snapshot_resolves_offline_and_converts(self):
    model = os.path.join(self.tmp, 'm')
    testutil.make_tiny_hf(model, seed=0)
    cache = os.path.join(self.tmp, 'hub')
    snap = fake_hub_cache(cache, 'someorg/tiny', model)
    with mock.patch.object(hub_constants, 'HF_HUB_CACHE', cache):
      got = models_io.resolve_model('someorg/tiny')
    self.assertEqual(os.path.realpath(got), os.path.realpath(snap))
    self.assertEqual(models_io.load_config(got).hidden_size, 64)
    # The convert CLI takes the id as --hf_dir (the cache from the env).
    env = dict(os.environ, HF_HUB_CACHE=cache, HF_HUB_OFFLINE='1',
               JAX_PLATFORMS='cpu')
    env.pop('XLA_FLAGS', None)
    out = os.path.join(self.tmp, 'params')
    p = subprocess.run([sys.executable, '-m', 'act_jax.convert',
                        '--hf_dir=someorg/tiny', '--params_dir=' + out],
                       cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    self.assertEqual(p.returncode, 0, p.stderr[-2000:])
    self.assertTrue(os.path.isfile(os.path.join(out, 'model_config.json')))
    p = subprocess.run([sys.executable, '-m', 'act_jax.convert',
                        '--hf_dir=someorg/missing', '--params_dir=' + out],
                       cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    self.assertEqual(p.returncode, 2)
    self.assertRegex(p.stderr.strip().splitlines()[-1],
                     r'someorg/missing: not a local directory.*hf download '
                     'someorg/missing')

  def test_pipeline_preflight_names_the_missing_hub_model(self):
    c = testutil.load_config('recover.py')
    data = os.path.join(self.tmp, 'd.jsonl')
    with open(data, 'w') as f:
      f.write('{"prompt": "1+1=", "answer": "2", "text": "1+1=2"}\n')
    src = os.path.join(self.tmp, 'src')
    testutil.make_tiny_hf(src, seed=0)
    c.models.source, c.models.target = src, 'someorg/missing-model'
    for a in ('ability', 'retain'):
      c.abilities[a].eval = data
    c.abilities.ability.probe = c.abilities.ability.sft = data
    work = os.path.join(self.tmp, 'work')
    with self.assertRaisesRegex(preflight.PreflightError,
                                r'^someorg/missing-model: not a local '
                                'directory.*hf download'):
      run_lib.run_pipeline(c, work)
    self.assertFalse(os.path.exists(os.path.join(work, 'convert')))


if __name__ == '__main__':
  absltest.main()
