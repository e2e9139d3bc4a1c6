"""Conversion cost: act-jax HF -> params against from_pretrained and the floor.

Each method runs in its own subprocess, so its peak resident set (VmHWM of
/proc/self/status: since its exec, not the forking parent's pages) is its
own, on the same checkpoint, side by side in one run:
  read bytes       read every byte of the safetensors files (the floor: any
                   loader must at least do this)
  from_pretrained  transformers AutoModelForCausalLM.from_pretrained, float32
  act-jax load     io.hf.load_hf_params: strict header checks, transposes,
                   the params on device
  act-jax convert  convert.convert_hf_to_params: load + the orbax params dir
                   written (what the pipeline's convert stage does)
The first pass over the files warms the page cache (discarded), so every
method reads from memory; each figure is the best of --repeats.

  ACT_JAX_CACHE=/tmp/act_cache python benchmarks/convert_bench.py
(the real SmolLM2-135M-Instruct, built once into $ACT_JAX_CACHE by
act_jax/cases/smollm2/weights.py), or --checkpoint=DIR for another one.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

import bench_common

_HF_DIR = flags.DEFINE_string('checkpoint', '', 'HF checkpoint dir; '
                              'default the SmolLM2-135M cache.')
_REPEATS = flags.DEFINE_integer('repeats', 2, 'Runs per method; best counts.')
_METHOD = flags.DEFINE_string('method', None, 'Internal: run one method.')
_OUT = flags.DEFINE_string('out', '', 'Internal: output dir for convert.')

METHODS = ('read bytes', 'from_pretrained', 'act-jax load',
           'act-jax convert')


def _files(hf_dir: str) -> list[str]:
  return sorted(glob.glob(os.path.join(hf_dir, '*.safetensors')))


def run_method(method: str, hf_dir: str, out: str) -> float:
  """Runs `method` once in this process; returns its wall seconds."""
  t0 = time.perf_counter()
  if method == 'read bytes':
    total = 0
    for f in _files(hf_dir):
      with open(f, 'rb') as fh:
        total += len(fh.read())
  elif method == 'from_pretrained':
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    transformers.AutoModelForCausalLM.from_pretrained(hf_dir,
                                                      dtype=torch.float32)
  elif method == 'act-jax load':
    import jax  # pylint: disable=g-import-not-at-top
    from act_jax.io import hf  # pylint: disable=g-import-not-at-top
    _, params = hf.load_hf_params(hf_dir, param_dtype='float32')
    jax.block_until_ready(params)
  elif method == 'act-jax convert':
    from act_jax import convert  # pylint: disable=g-import-not-at-top
    convert.convert_hf_to_params(hf_dir, out, param_dtype='float32')
  else:
    raise ValueError(f'unknown method {method!r}')
  return time.perf_counter() - t0


def peak_rss_kib() -> int:
  """This process's peak resident set since its exec (VmHWM), KiB."""
  with open('/proc/self/status', encoding='ascii') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1])
  raise RuntimeError('no VmHWM in /proc/self/status')


def _subprocess(method: str, hf_dir: str) -> tuple[float, float, float]:
  """(method wall s, process wall s, peak RSS GiB) of one run."""
  out = tempfile.mkdtemp(prefix='act_convert_bench_')
  shutil.rmtree(out)
  cmd = [sys.executable, os.path.abspath(__file__), f'--method={method}',
         f'--checkpoint={hf_dir}', f'--out={out}']
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - t0
  shutil.rmtree(out, ignore_errors=True)
  if proc.returncode != 0:
    raise RuntimeError(f'{method} failed:\n{proc.stderr[-2000:]}')
  inner, rss_kib = proc.stdout.strip().splitlines()[-1].split()
  return float(inner), wall, int(rss_kib) / 2**20


def main(argv):
  del argv
  hf_dir = _HF_DIR.value
  if not hf_dir:
    from act_jax.cases.smollm2 import weights  # pylint: disable=g-import-not-at-top
    hf_dir = weights.smollm2_hf_dir()
  if _METHOD.value:
    wall = run_method(_METHOD.value, hf_dir, _OUT.value)
    print(wall, peak_rss_kib())
    return
  print(bench_common.header('convert_bench', ' '.join(
      ['python benchmarks/convert_bench.py'] + sys.argv[1:])), flush=True)
  size = sum(os.path.getsize(f) for f in _files(hf_dir))
  run_method('read bytes', hf_dir, '')  # warm the page cache
  best = {}
  for _ in range(_REPEATS.value):  # interleaved: load hits all alike
    for m in METHODS:
      got = _subprocess(m, hf_dir)
      old = best.get(m)
      best[m] = got if old is None else tuple(min(a, b)
                                              for a, b in zip(old, got))
  floor = best['read bytes']
  print(f'\n{hf_dir}: {size / 2**20:.0f} MiB of safetensors; best of '
        f'{_REPEATS.value}; load average at the end '
        f'{bench_common.load_average()}')
  print('| method | wall / floor | RSS / floor | wall s (in process) | '
        'process wall s (with imports) | peak RSS GiB |')
  print('|---|---|---|---|---|---|')
  for m in METHODS:
    inner, wall, rss = best[m]
    print(f'| {m} | {inner / floor[0]:.2f}x | {rss / floor[2]:.2f}x | '
          f'{inner:.2f} | {wall:.1f} | {rss:.2f} |')
  print('\nwall / floor compares the in-process time of the work (imports '
        'excluded, shown in the process column); RSS is the whole process '
        'peak, interpreter and libraries included.')


if __name__ == '__main__':
  app.run(main)
