"""Transfer / merge cost on SmolLM2-135M-shaped checkpoints vs mergekit TIES.

  /work/venv/bin/python benchmarks/transfer_bench.py [--work=/tmp/act_tb]

Builds (once, cached in --work, outside the repo) four random Llama
checkpoints with SmolLM2-135M shapes (hidden 576, 30 layers, 9 heads, 3 kv
heads, intermediate 1536, vocab 49152, tied embeddings; float32
safetensors): a base and three "specialists" (base + small noise). Then runs
each method in its own subprocess, end to end (read safetensors, compute,
write an HF checkpoint), and reports wall time and that process's peak RSS
(os.wait4), side by side in one run:
  act_transplant  1 source, 5% channels per (site, layer)
  act_merge3      3 sources, 5% channels each, policy=average
  jax_ties3       act_jax.baselines.ties, density 0.2
  mergekit_ties3  mergekit-yaml, method ties, density 0.2, weight 1
Also prints the in-process compute time of our methods and the max abs
difference between jax_ties3 and mergekit_ties3 outputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

flags.DEFINE_string('work', '/tmp/act_transfer_bench', 'Cache / output dir.')
flags.DEFINE_string('method', None, 'Internal: run one method and exit.')
flags.DEFINE_integer('layers', 30, 'Decoder layers (30 = SmolLM2-135M).')
flags.DEFINE_float('density', 0.2, 'TIES density.')
flags.DEFINE_float('top_frac', 0.05, 'ACT channel fraction per site-layer.')
FLAGS = flags.FLAGS

METHODS = ('act_transplant', 'act_merge3', 'jax_ties3', 'mergekit_ties3')


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


def _act_masks(cfg, k: int, top_frac: float):
  from act_jax.act import masks  # pylint: disable=g-import-not-at-top
  from act_jax.act import localize  # pylint: disable=g-import-not-at-top
  out = []
  for i in range(k):
    s = localize.random_scores(masks.site_shapes(cfg), seed=i)
    s = {n: v for n, v in s.items() if n in masks.capture.OUTPUT_SITES}
    out.append(localize.select_channels(s, top_frac=top_frac))
  return out


def run_method(method: str, work: str) -> dict:
  """Runs one of our methods end to end; returns in-process timings."""
  import jax  # pylint: disable=g-import-not-at-top
  from act_jax.act import baselines  # pylint: disable=g-import-not-at-top
  from act_jax.io import hf  # pylint: disable=g-import-not-at-top
  from act_jax.act import transfer  # pylint: disable=g-import-not-at-top
  dirs = _dirs(work)
  out_dir = os.path.join(work, 'out_' + method)
  t0 = time.time()
  n = 2 if method == 'act_transplant' else 4
  loaded = [hf.load_hf_params(d) for d in dirs[:n]]
  cfg = loaded[0][0]
  params = [p for _, p in loaded]
  jax.block_until_ready(params)
  t1 = time.time()
  if method == 'act_transplant':
    (m,) = _act_masks(cfg, 1, FLAGS.top_frac)
    res = transfer.transplant_channels(params[0], params[1], m)
  elif method == 'act_merge3':
    ms = _act_masks(cfg, 3, FLAGS.top_frac)
    res, rep = transfer.merge(params[0], params[1:], ms, policy='average')
    print('conflicts', rep['num_conflicts'], file=sys.stderr)
  else:
    res = baselines.ties(params[0], params[1:], density=FLAGS.density)
  jax.block_until_ready(res)
  t2 = time.time()
  hf.save_hf(res, cfg, out_dir, overwrite=True,
             hf_config=hf.read_hf_config_dict(dirs[0]))
  t3 = time.time()
  return {'load_s': t1 - t0, 'compute_s': t2 - t1, 'save_s': t3 - t2}


def _mergekit_config(work: str) -> str:
  dirs = _dirs(work)
  lines = ['merge_method: ties', f'base_model: {dirs[0]}', 'dtype: float32',
           'models:']
  for d in dirs[1:]:
    lines += [f'  - model: {d}', '    parameters:',
              f'      density: {FLAGS.density}', '      weight: 1.0']
  lines += ['parameters:', '  normalize: true']
  path = os.path.join(work, 'mergekit_ties.yml')
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return path


def _timed_child(cmd: list[str]) -> dict:
  """Runs cmd; wall and peak RSS of that child only (wait4)."""
  t0 = time.time()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=dict(os.environ, HF_HUB_OFFLINE='1'))
  # Read pipes while waiting (no deadlock on large stderr), then reap with
  # wait4 to get this child's own rusage.
  import threading  # pylint: disable=g-import-not-at-top
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
  return {'wall_s': wall, 'peak_rss_gb': usage.ru_maxrss / 2**20,
          'stdout': bufs['out'].decode()}


def _max_diff(a_dir: str, b_dir: str) -> float:
  import glob  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  load = lambda d: {k: v for f in sorted(glob.glob(os.path.join(
      d, '*.safetensors'))) for k, v in load_file(f).items()}
  a, b = load(a_dir), load(b_dir)
  keys = sorted(set(a) & set(b))
  if not keys:
    return float('nan')
  return max(float(np.abs(a[k].astype(np.float32) -
                          b[k].astype(np.float32)).max()) for k in keys)


def main(argv):
  del argv
  work = os.path.abspath(FLAGS.work)
  if FLAGS.method:
    print(json.dumps(run_method(FLAGS.method, work)))
    return
  os.makedirs(work, exist_ok=True)
  t = time.time()
  build_checkpoints(work, FLAGS.layers)
  print(f'checkpoints ready in {work} ({time.time() - t:.0f}s)')
  results = {}
  me = [sys.executable, os.path.abspath(__file__), f'--work={work}',
        f'--layers={FLAGS.layers}', f'--density={FLAGS.density}',
        f'--top_frac={FLAGS.top_frac}']
  for method in METHODS:
    if method == 'mergekit_ties3':
      out = os.path.join(work, 'out_mergekit_ties3')
      cmd = [os.path.join(os.path.dirname(sys.executable), 'mergekit-yaml'),
             _mergekit_config(work), out, '--quiet', '--lazy-unpickle']
    else:
      cmd = me + [f'--method={method}']
    r = _timed_child(cmd)
    if method != 'mergekit_ties3':
      r.update(json.loads(r['stdout'].strip().splitlines()[-1]))
    del r['stdout']
    results[method] = r
    print(method, json.dumps({k: round(v, 2) for k, v in r.items()}))
  ref = results['mergekit_ties3']
  print('\nmethod            wall_s  peak_rss_GB  wall/mergekit  rss/mergekit'
        '  compute_s')
  for m, r in results.items():
    print(f'{m:16s} {r["wall_s"]:7.1f} {r["peak_rss_gb"]:11.2f} '
          f'{r["wall_s"] / ref["wall_s"]:13.2f} '
          f'{r["peak_rss_gb"] / ref["peak_rss_gb"]:12.2f}'
          f'  {r.get("compute_s", float("nan")):8.2f}')
  print('max |jax_ties3 - mergekit_ties3| =',
        _max_diff(os.path.join(work, 'out_jax_ties3'),
                  os.path.join(work, 'out_mergekit_ties3')))


if __name__ == '__main__':
  app.run(main)
