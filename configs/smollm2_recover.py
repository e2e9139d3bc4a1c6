"""ACT recover on the real SmolLM2-135M (minimal; a later issue does the study).

The float32 SmolLM2-135M-Instruct HF directory is built offline by
`tests/smollm2_util.smollm2_hf_dir()` into `$ACT_JAX_CACHE` (default
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
"""

import os


def get_config():
  """SmolLM2-135M recover config (CPU-sized batches)."""
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
