"""Out-of-core transfer / merge vs mergekit and vs the I/O floor.

  python benchmarks/transfer_bench.py [--work=/tmp/act_transfer_bench]

Builds (once, cached in --work, outside the repo) four random Llama
checkpoints with SmolLM2-135M shapes (hidden 576, 30 layers, 9 heads, 3 kv
heads, intermediate 1536, vocab 49152, tied embeddings; float32
safetensors, 538 MB each): a base and three "specialists" (base + small
noise). Every method then runs end to end in its own subprocess (read the
safetensors, compute, write an HF checkpoint) and reports that process's
wall time and peak RSS (os.wait4), all in one run:
  floor_k        the I/O floor for k inputs: read the k inputs' files and
                 write the output's bytes (64 MB chunks, no compute)
  act_transplant / act_merge3   act.stream with 5% random channels per
                 (site, layer), one source / three (policy average)
  <m>3           act.stream method m over the three specialists
                 (base = the base for task_arithmetic, ties, dare)
  mergekit_<m>3  mergekit-yaml (0.1.5, --lazy-unpickle, default shard
                 size) doing the same method: linear, task_arithmetic, ties,
                 dare_linear (its DARE + task arithmetic)
Printed as ratios (machines differ; see benchmarks/README.md): wall over
the floor with the same number of inputs, wall and peak RSS over mergekit
doing the same method, and the largest |difference| between our and
mergekit's outputs where the method is deterministic.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import threading
import time

from absl import app
from absl import flags

flags.DEFINE_string('work', '/tmp/act_transfer_bench', 'Cache / output dir.')
flags.DEFINE_string('method', None, 'Internal: run one method and exit.')
flags.DEFINE_integer('layers', 30, 'Decoder layers (30 = SmolLM2-135M).')
flags.DEFINE_float('density', 0.2, 'TIES density.')
flags.DEFINE_float('drop', 0.9, 'DARE drop probability.')
flags.DEFINE_float('top_frac', 0.05, 'ACT channel fraction per site-layer.')
flags.DEFINE_list('only', [], 'Run only these methods (default all).')
FLAGS = flags.FLAGS

OURS = ('act_transplant', 'act_merge3', 'linear3', 'task_arithmetic3',
        'ties3', 'dare3')
MERGEKIT = {'linear3': 'linear', 'task_arithmetic3': 'task_arithmetic',
            'ties3': 'ties', 'dare3': 'dare_linear'}
CHUNK = 64 * 2**20


def _dirs(work):
  return [os.path.join(work, n) for n in ('base', 's1', 's2', 's3')]


def build_checkpoints(work: str, layers: int) -> None:
  """Four float32 HF checkpoints with SmolLM2-135M shapes (cached)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  dirs = _dirs(work)
  if all(os.path.isfile(os.path.join(d, 'model.safetensors')) for d in dirs):
    return
  cfg = transformers.LlamaConfig(
      vocab_size=49152, hidden_size=576, intermediate_size=1536,
      num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
      max_position_embeddings=2048, rope_theta=100000.0,
      tie_word_embeddings=True, rms_norm_eps=1e-5)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(cfg).eval()
  base = {k: v.clone() for k, v in model.state_dict().items()}
  model.save_pretrained(dirs[0])
  for i, d in enumerate(dirs[1:], start=1):
    g = torch.Generator().manual_seed(i)
    with torch.no_grad():
      for k, p in model.named_parameters():
        p.copy_(base[k] + 0.002 * torch.randn(p.shape, generator=g))
    model.save_pretrained(d)


def _files(d: str) -> list[str]:
  return sorted(glob.glob(os.path.join(d, '*.safetensors')))


def io_floor(work: str, num_inputs: int, out_dir: str) -> None:
  """Reads `num_inputs` checkpoints' bytes, writes the base's size."""
  os.makedirs(out_dir, exist_ok=True)
  for d in _dirs(work)[:num_inputs]:
    for f in _files(d):
      with open(f, 'rb') as fh:
        while fh.read(CHUNK):
          pass
  size = sum(os.path.getsize(f) for f in _files(_dirs(work)[0]))
  block = b'\0' * CHUNK
  with open(os.path.join(out_dir, 'out.bin'), 'wb') as fh:
    while size > 0:
      fh.write(block[:min(size, CHUNK)])
      size -= CHUNK


def _act_masks(cfg, k: int, top_frac: float):
  from act_jax.act import localize  # pylint: disable=g-import-not-at-top
  from act_jax.act import masks  # pylint: disable=g-import-not-at-top
  from act_jax.model import capture  # pylint: disable=g-import-not-at-top
  out = []
  for i in range(k):
    s = localize.random_scores(masks.site_shapes(cfg), seed=i)
    s = {n: v for n, v in s.items() if n in capture.OUTPUT_SITES}
    out.append(localize.select_channels(s, top_frac=top_frac))
  return out


def run_method(method: str, work: str) -> None:
  """One of our methods end to end (the child process's body)."""
  dirs = _dirs(work)
  out = os.path.join(work, 'out_' + method)
  if method.startswith('floor'):
    io_floor(work, int(method[len('floor'):]), out)
    return
  from act_jax.act import stream  # pylint: disable=g-import-not-at-top
  from act_jax.io import models  # pylint: disable=g-import-not-at-top
  cfg = models.load_config(dirs[0])
  if method == 'act_transplant':
    stream.transfer_checkpoints('act', dirs[0], dirs[1:2], out,
                                masks=_act_masks(cfg, 1, FLAGS.top_frac),
                                overwrite=True)
    return
  if method == 'act_merge3':
    stream.transfer_checkpoints('act', dirs[0], dirs[1:], out,
                                masks=_act_masks(cfg, 3, FLAGS.top_frac),
                                overwrite=True)
    return
  stream.transfer_checkpoints(method[:-1], dirs[0], dirs[1:], out,
                              lam=1.0, density=FLAGS.density,
                              drop=FLAGS.drop, overwrite=True)


def _mergekit_config(work: str, method: str) -> str:
  dirs = _dirs(work)
  lines = [f'merge_method: {method}', 'dtype: float32']
  if method != 'linear':
    lines.append(f'base_model: {dirs[0]}')
  lines.append('models:')
  for d in dirs[1:]:
    lines += [f'  - model: {d}', '    parameters:', '      weight: 1.0']
    if method == 'ties':
      lines.append(f'      density: {FLAGS.density}')
    if method == 'dare_linear':
      lines.append(f'      density: {1 - FLAGS.drop:g}')
  normalize = 'true' if method in ('linear', 'ties') else 'false'
  lines += ['parameters:', f'  normalize: {normalize}']
  path = os.path.join(work, f'mergekit_{method}.yml')
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return path


def _timed_child(cmd: list[str]) -> dict:
  """Runs cmd; wall and peak RSS of that child only (wait4)."""
  t0 = time.time()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=dict(os.environ, HF_HUB_OFFLINE='1',
                                   JAX_PLATFORMS='cpu'))
  bufs = {}

  def drain(name, pipe):
    bufs[name] = pipe.read()

  threads = [threading.Thread(target=drain, args=(n, p))
             for n, p in (('out', proc.stdout), ('err', proc.stderr))]
  for t in threads:
    t.start()
  _, status, usage = os.wait4(proc.pid, 0)
  for t in threads:
    t.join()
  wall = time.time() - t0
  if os.waitstatus_to_exitcode(status):
    raise RuntimeError(f'{cmd} failed:\n{bufs["err"].decode()[-3000:]}')
  return {'wall_s': wall, 'peak_rss_gb': usage.ru_maxrss / 2**20}


def _max_diff(a_dir: str, b_dir: str) -> float:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  def where(d):
    out = {}
    for f in _files(d):
      with safe_open(f, 'numpy') as fh:
        out.update({k: f for k in fh.keys()})
    return out

  a, b = where(a_dir), where(b_dir)
  worst = 0.0
  for k in sorted(set(a) & set(b)):
    with safe_open(a[k], 'numpy') as fa, safe_open(b[k], 'numpy') as fb:
      x, y = fa.get_tensor(k), fb.get_tensor(k)
    worst = max(worst, float(np.abs(x.astype(np.float32) -
                                    y.astype(np.float32)).max()))
  return worst


def _inputs(method: str) -> int:
  return 2 if method == 'act_transplant' else 4


def main(argv):
  del argv
  work = os.path.abspath(FLAGS.work)
  if FLAGS.method:
    run_method(FLAGS.method, work)
    return
  os.makedirs(work, exist_ok=True)
  t = time.time()
  build_checkpoints(work, FLAGS.layers)
  print(f'checkpoints ready in {work} ({time.time() - t:.0f}s)', flush=True)
  me = [sys.executable, os.path.abspath(__file__), f'--work={work}',
        f'--layers={FLAGS.layers}', f'--density={FLAGS.density}',
        f'--drop={FLAGS.drop}', f'--top_frac={FLAGS.top_frac}']
  mk = os.path.join(os.path.dirname(sys.executable), 'mergekit-yaml')
  run = {}
  io_floor(work, 4, os.path.join(work, 'warm'))  # page cache warm for all
  plan = ['floor2', 'floor4'] + list(OURS) + [f'mergekit_{m}'
                                               for m in MERGEKIT]
  for name in plan:
    if FLAGS.only and name not in FLAGS.only and not name.startswith(
        'floor'):
      continue
    if name.startswith('mergekit_'):
      method = name[len('mergekit_'):]
      cmd = [mk, _mergekit_config(work, MERGEKIT[method]),
             os.path.join(work, 'out_' + name), '--quiet', '--lazy-unpickle']
    else:
      cmd = me + [f'--method={name}']
    run[name] = _timed_child(cmd)
    print(name, json.dumps({k: round(v, 2) for k, v in run[name].items()}),
          flush=True)
  print('\n| method | inputs | wall / I/O floor | wall / mergekit | '
        'peak RSS / mergekit | peak RSS / input model | max abs diff vs '
        'mergekit |\n| --- | --- | --- | --- | --- | --- | --- |')
  model_gb = sum(os.path.getsize(f) for f in _files(_dirs(work)[0])) / 2**30
  for name in list(OURS) + [f'mergekit_{m}' for m in MERGEKIT]:
    if name not in run:
      continue
    r = run[name]
    base = name[len('mergekit_'):] if name.startswith('mergekit_') else name
    floor = run[f'floor{_inputs(base)}']['wall_s']
    ref = run.get(f'mergekit_{base}') if base in MERGEKIT else None
    cells = [f'{r["wall_s"] / floor:.2f}']
    cells.append(f'{r["wall_s"] / ref["wall_s"]:.2f}' if ref else '-')
    cells.append(f'{r["peak_rss_gb"] / ref["peak_rss_gb"]:.2f}' if ref
                 else '-')
    cells.append(f'{r["peak_rss_gb"] / model_gb:.2f}')
    diff = '-'
    if ref and base != 'dare3' and not name.startswith('mergekit_'):
      d = _max_diff(os.path.join(work, 'out_' + name),
                    os.path.join(work, 'out_mergekit_' + base))
      diff = f'{d:.2g}'
    print(f'| {name} | {_inputs(base)} | ' + ' | '.join(cells) +
          f' | {diff} |')
  print(f'\nabsolute (this machine): ' + ', '.join(
      f'{n} {r["wall_s"]:.1f}s {r["peak_rss_gb"]:.2f}GB'
      for n, r in run.items()) + f'; one input model {model_gb:.2f} GB')


if __name__ == '__main__':
  app.run(main)
