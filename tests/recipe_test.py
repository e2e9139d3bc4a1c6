"""BUILD.md's recipe, "recover an ability in your own pair of models", run.

The command is read from BUILD.md (the block after `recipe-command`) with
its toy-size flags (after `recipe-toy-flags`), so the documented command is
the tested one. The pair: the package-shipped SmolLM2-135M-Instruct (real
weights, BPE tokenizer, chat template) cut to its first two layers as the
source, and the same with seeded noise on its MLP weights as the target;
the data are the `examples/` files.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest
import huggingface_hub
import numpy as np
from safetensors import numpy as st_numpy
import transformers

from act_jax.cases.smollm2 import weights
from act_jax.io import params as params_io
import testutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = 2


def build_md_block(marker: str) -> list[str]:
  """The shell words of the first fenced block after `marker` in BUILD.md."""
  with open(os.path.join(REPO, 'BUILD.md'), encoding='utf-8') as f:
    text = f.read()
  block = re.search(re.escape(marker) + r'.*?\n```bash\n(.*?)```', text,
                    re.S).group(1)
  return shlex.split(block.replace('\\\n', ' '))


def cut_model(src: str, out: str, noise: float = 0.0, seed: int = 0) -> None:
  """`src`'s first LAYERS layers as an HF dir (MLP weights + noise)."""
  os.makedirs(out)
  with open(os.path.join(src, 'config.json')) as f:
    cfg = json.load(f)
  cfg['num_hidden_layers'] = LAYERS
  with open(os.path.join(out, 'config.json'), 'w') as f:
    json.dump(cfg, f)
  rng = np.random.default_rng(seed)
  keep = {}
  for k, v in st_numpy.load_file(os.path.join(src, 'model.safetensors')
                                 ).items():
    m = re.match(r'model\.layers\.(\d+)\.', k)
    if m and int(m.group(1)) >= LAYERS:
      continue
    if noise and re.search(r'mlp\.(up|down)_proj', k):
      v = (v + noise * v.std() * rng.standard_normal(v.shape)).astype(v.dtype)
    keep[k] = v
  st_numpy.save_file(keep, os.path.join(out, 'model.safetensors'),
                     metadata={'format': 'pt'})
  params_io.copy_aux_files(src, out)


class RecipeTest(absltest.TestCase):

  def test_the_build_md_recipe_at_toy_size(self):
    tmp = tempfile.mkdtemp()
    real = weights.smollm2_hf_dir()
    src, tgt = os.path.join(tmp, 'source'), os.path.join(tmp, 'target')
    cut_model(real, src)
    cut_model(real, tgt, noise=0.5, seed=1)
    work = os.path.join(tmp, 'runs', 'mine')
    argv = build_md_block('<!-- recipe-command')
    self.assertEqual(argv[:3], ['python', '-m', 'act_jax.main'])
    subs = {'--workdir': work, '--config.models.source': src,
            '--config.models.target': tgt}
    for i, a in enumerate(argv):
      key = a.split('=', 1)[0]
      if key in subs:
        argv[i] = f'{key}={subs.pop(key)}'
    self.assertEqual(subs, {})  # the block names all three
    argv += build_md_block('<!-- recipe-toy-flags')
    env = dict(os.environ, JAX_PLATFORMS='cpu', HF_HUB_OFFLINE='1')
    env.pop('XLA_FLAGS', None)
    p = subprocess.run([sys.executable] + argv[1:], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=1200)
    self.assertEqual(p.returncode, 0, p.stderr[-4000:])
    self.assertTrue(os.path.isfile(os.path.join(work, 'report.md')))
    samples = testutil.read_jsonl(os.path.join(
        work, 'evaluate', 'recover', 'samples', 'target', 'ability.jsonl'))
    self.assertLen(samples, 4)
    # The chat template of the real tokenizer renders every prompt.
    self.assertTrue(all(s['prompt'].endswith(
        '<|im_start|>user\n' + q['prompt'] + '<|im_end|>\n'
        '<|im_start|>assistant\n') for s, q in zip(
            samples, testutil.read_jsonl(os.path.join(
                REPO, 'examples', 'qa', 'eval.jsonl')))))
    english = testutil.read_jsonl(os.path.join(
        work, 'evaluate', 'recover', 'samples', 'source', 'retain.jsonl'))
    self.assertLen(english, 4)
    for result in ('act', 'act_ft'):
      out = os.path.join(work, 'export', 'recover', result)
      model = transformers.AutoModelForCausalLM.from_pretrained(out)
      self.assertEqual(model.config.num_hidden_layers, LAYERS)
      card = huggingface_hub.ModelCard.load(os.path.join(out, 'README.md'))
      self.assertEqual(card.data.base_model, [tgt, src])
    shutil.rmtree(tmp)


if __name__ == '__main__':
  absltest.main()
