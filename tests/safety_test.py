"""Never lose a user's data, never mix two runs (issue 13).

One test per data-loss case the issue found, each failing on the code before
the fix: outputs that replaced what act-jax did not write (collect,
localize), resumes that trusted paths instead of contents (collect,
fine-tune, pipeline stages), a NaN alpha, two writers of one output,
symlinks out of a checkpoint, and errors that did not say what to fix.
Real parts throughout: tiny random HF checkpoints, real CLIs in
subprocesses where the exit status, the one-line error or a SIGKILL is the
point, the library in-process elsewhere. Assertions name messages rather
than new classes where they can, so the same file run against the old code
fails by behaviour, not by import.
"""

import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import types

from absl.testing import absltest
import jax
import ml_collections
import numpy as np

import testutil
from act_jax import collect as collect_cli
from act_jax import convert
from act_jax import data
from act_jax import localize as localize_cli
from act_jax import transfer as transfer_cli
from act_jax.io import atomic
from act_jax.io import hf
from act_jax.io import params as params_io
from act_jax.io import stats as stats_io
from act_jax.pipeline import jobs
from act_jax.pipeline import preflight
from act_jax.pipeline import runner
from act_jax.train import finetune

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITES = 'mlp.down_proj,self_attn.o_proj'


def _env():
  env = dict(os.environ, JAX_PLATFORMS='cpu', HF_HUB_OFFLINE='1',
             HF_DATASETS_OFFLINE='1', PYTHONPATH=REPO + os.pathsep +
             os.environ.get('PYTHONPATH', ''))
  env.pop('XLA_FLAGS', None)
  return env


def _cli(module, *args, **kw):
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO,
                        env=_env(), capture_output=True, text=True,
                        timeout=600, **kw)


def _tree_digest(root):
  """SHA-256 of every file under `root` (names and bytes)."""
  h = hashlib.sha256()
  for d, dirs, fs in sorted(os.walk(root)):
    dirs.sort()
    for f in sorted(fs):
      p = os.path.join(d, f)
      h.update(os.path.relpath(p, root).encode())
      with open(p, 'rb') as fh:
        h.update(fh.read())
  return h.hexdigest()


def _write_probe(path, n=12, seed=0):
  rng = np.random.RandomState(seed)
  with open(path, 'w') as f:
    for i in range(n):
      words = ' '.join('w%d' % rng.randint(100)
                       for _ in range(rng.randint(2, 8)))
      f.write(json.dumps({'text': f'{i}: {words}'}) + '\n')


def _collect_flags(**kw):
  base = dict(models=None, probe=None, out=None, tokenizer=None,
              template='text', text_field='text', prompt_field='question',
              response_field='answer', qa_format=data.DEFAULT_QA_FORMAT,
              split='train', num_probe=0, max_seq_len=24, batch_size=4,
              probe_pack=False, overflow='truncate', count_tokens='all',
              sites=SITES, mesh_shape=['-1', '1', '1'], models_axis=None,
              models_per_pass=0, dtype='', save_every=0, throttle_s=0.0,
              shuffle_seed=None, overwrite=False, restart=False,
              follow_symlinks=False, attribution=False)
  base.update(kw)
  return types.SimpleNamespace(**base)


def _localize_flags(**kw):
  base = dict(score='mean_abs_diff', select='per_site', top_frac=0.05,
              threshold=0.0, mass=0.8, site_overrides='', sites=None,
              unit='channel', seed=0, baselines=False, compare_stats=None,
              other_masks=[], plots=False, source='1', target='0',
              overwrite=False, follow_symlinks=False)
  base.update(kw)
  return types.SimpleNamespace(**base)


def _transfer_flags(**kw):
  base = dict(hf_out=None, policy='average', alpha=1.0, include=[],
              unit='channel', priority=None, allow_other_models=False,
              overwrite=False, follow_symlinks=False, method='act',
              max_shard_bytes=2**30, interp_t=0.5, ta_lambda=0.5,
              ties_density=0.2, dare_drop=0.9, seed=0)
  base.update(kw)
  return types.SimpleNamespace(**base)


class OutputsTest(absltest.TestCase):
  """Commands replace only act-jax's own artifacts, never their inputs."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp(prefix='safety_test_')
    cls.models = [os.path.join(cls.tmp, f'm{i}') for i in range(2)]
    for i, d in enumerate(cls.models):
      testutil.make_tiny_hf(d, 'llama', seed=i)
    cls.probe = os.path.join(cls.tmp, 'probe.jsonl')
    _write_probe(cls.probe)
    cls.stats = os.path.join(cls.tmp, 'stats')
    collect_cli.run_cli(_collect_flags(models=cls.models, probe=cls.probe,
                                       out=cls.stats))

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def _folder_of_user_files(self, name):
    d = os.path.join(self.tmp, name)
    os.makedirs(d)
    with open(os.path.join(d, 'thesis.txt'), 'w') as f:
      f.write('years of work')
    return d

  def test_collect_never_replaces_what_it_did_not_write(self):
    mine = self._folder_of_user_files('collect_user')
    before = _tree_digest(mine)
    flags = dict(models=self.models, probe=self.probe)
    with self.assertRaisesRegex(FileExistsError, 'already exists'):
      collect_cli.run_cli(_collect_flags(out=mine, **flags))
    with self.assertRaisesRegex(FileExistsError, 'not written by act-jax'):
      collect_cli.run_cli(_collect_flags(out=mine, overwrite=True, **flags))
    self.assertEqual(_tree_digest(mine), before)
    # A model of --models as --out: refused, with or without --overwrite.
    model = self.models[1]
    digest = _tree_digest(model)
    for overwrite in (False, True):
      with self.assertRaisesRegex(FileExistsError, 'is an input|exists'):
        collect_cli.run_cli(_collect_flags(out=model, overwrite=overwrite,
                                           **flags))
    self.assertEqual(_tree_digest(model), digest)
    # An OUT.ckpt this CLI did not create is neither used nor deleted.
    out = os.path.join(self.tmp, 'collect_fresh')
    ckpt = self._folder_of_user_files('collect_fresh.ckpt')
    with self.assertRaisesRegex(FileExistsError, r'collect_fresh\.ckpt'):
      collect_cli.run_cli(_collect_flags(out=out, save_every=1, **flags))
    self.assertTrue(os.path.isfile(os.path.join(ckpt, 'thesis.txt')))
    self.assertFalse(os.path.exists(out))
    # Its own statistics: replaced with --overwrite only.
    with self.assertRaisesRegex(FileExistsError, 'already exists'):
      collect_cli.run_cli(_collect_flags(out=self.stats, **flags))
    again = os.path.join(self.tmp, 'collect_again')
    collect_cli.run_cli(_collect_flags(out=again, **flags))
    collect_cli.run_cli(_collect_flags(out=again, overwrite=True, **flags))
    self.assertEqual(atomic.read_marker(again)['kind'], 'stats')

  def test_localize_never_replaces_its_inputs(self):
    digest = _tree_digest(self.stats)
    for overwrite in (False, True):
      with self.assertRaisesRegex(FileExistsError, 'is an input|exists'):
        localize_cli.run_cli(_localize_flags(stats=self.stats,
                                             out=self.stats,
                                             overwrite=overwrite))
    self.assertEqual(_tree_digest(self.stats), digest)
    stats_io.load_stats(self.stats)
    mine = self._folder_of_user_files('localize_user')
    with self.assertRaisesRegex(FileExistsError, 'not written by act-jax'):
      localize_cli.run_cli(_localize_flags(stats=self.stats, out=mine,
                                           overwrite=True))
    self.assertTrue(os.path.isfile(os.path.join(mine, 'thesis.txt')))
    # A folder holding the stats is refused too (it "contains an input").
    with self.assertRaisesRegex(FileExistsError, 'contains an input'):
      localize_cli.run_cli(_localize_flags(stats=self.stats, out=self.tmp,
                                           overwrite=True))
    out = os.path.join(self.tmp, 'loc')
    localize_cli.run_cli(_localize_flags(stats=self.stats, out=out))
    localize_cli.run_cli(_localize_flags(stats=self.stats, out=out,
                                         overwrite=True, top_frac=0.1))
    self.assertEqual(atomic.read_marker(out)['kind'], 'localize')

  def test_transfer_refuses_nan_alpha_and_its_target_as_out(self):
    masks = os.path.join(self.tmp, 'loc_for_transfer')
    localize_cli.run_cli(_localize_flags(stats=self.stats, out=masks))
    out = os.path.join(self.tmp, 'nan')
    p = _cli('act_jax.transfer', f'--target={self.models[0]}',
             f'--source={self.models[1]}', f'--masks={masks}', f'--out={out}',
             '--alpha=nan')
    self.assertEqual(p.returncode, 2, p.stderr[-2000:])
    self.assertRegex(p.stderr.strip().splitlines()[-1],
                     r'^error: --alpha=nan: expected a finite number')
    self.assertFalse(os.path.exists(out))
    with self.assertRaisesRegex(ValueError, 'alpha=inf'):
      transfer_cli.run_cli(_transfer_flags(
          target=self.models[0], source=[self.models[1]], masks=[masks],
          out=out, alpha=math.inf))
    # A converted params dir as both --target and --out, with --overwrite.
    target = os.path.join(self.tmp, 'target_params')
    convert.convert_hf_to_params(self.models[0], target)
    digest = _tree_digest(target)
    with self.assertRaisesRegex(FileExistsError, 'is an input'):
      transfer_cli.run_cli(_transfer_flags(
          target=target, source=[self.models[1]], masks=[masks], out=target,
          overwrite=True, allow_other_models=True))
    self.assertEqual(_tree_digest(target), digest)
    # --out and --hf_out the same folder: refused before any write.
    same = os.path.join(self.tmp, 'same')
    with self.assertRaisesRegex(FileExistsError, 'overlap'):
      transfer_cli.run_cli(_transfer_flags(
          target=self.models[0], source=[self.models[1]], masks=[masks],
          out=same, hf_out=same))
    self.assertFalse(os.path.exists(same))


class ResumeTest(absltest.TestCase):
  """A resume checks what it reads by content, not by path."""

  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp(prefix='safety_resume_')
    self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)

  def _killed_collect(self, models, probe, out):
    """A collect CLI run SIGKILLed after its first checkpoint."""
    cmd = [sys.executable, '-m', 'act_jax.collect',
           '--models=' + ','.join(models), f'--probe={probe}', f'--out={out}',
           f'--sites={SITES}', '--max_seq_len=24', '--batch_size=2',
           '--save_every=2', '--throttle_s=0.5']
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt, deadline = out + '.ckpt', time.time() + 300
    while time.time() < deadline and proc.poll() is None:
      if os.path.isdir(ckpt) and any(n.isdigit() for n in os.listdir(ckpt)):
        break
      time.sleep(0.1)
    self.assertIsNone(proc.poll(), 'collect ended before it was killed')
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return cmd[:-1]

  def test_collect_resume_refuses_changed_model_or_probe(self):
    models = [os.path.join(self.tmp, f'm{i}') for i in range(2)]
    for i, d in enumerate(models):
      testutil.make_tiny_hf(d, 'llama', seed=i)
    probe = os.path.join(self.tmp, 'probe.jsonl')
    _write_probe(probe)
    out = os.path.join(self.tmp, 'stats')
    cmd = self._killed_collect(models, probe, out)
    # The same path, the same size, other weights.
    shutil.rmtree(models[1])
    testutil.make_tiny_hf(models[1], 'llama', seed=7)
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=600)
    self.assertEqual(p.returncode, 2, p.stderr[-3000:])
    last = p.stderr.strip().splitlines()[-1]
    self.assertIn(models[1], last)
    self.assertIn('changed since the interrupted run', last)
    self.assertIn('--restart', last)
    self.assertFalse(os.path.exists(out))
    # --restart really restarts: the statistics of the new models alone.
    p = subprocess.run(cmd + ['--restart'], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=600)
    self.assertEqual(p.returncode, 0, p.stderr[-3000:])
    self.assertNotIn('resumed from', p.stderr)
    fresh = os.path.join(self.tmp, 'fresh')
    collect_cli.run_cli(_collect_flags(models=models, probe=probe, out=fresh,
                                       batch_size=2))
    got, want = stats_io.load_stats(out), stats_io.load_stats(fresh)
    for site in want.arrays:
      for stat, v in want.arrays[site].items():
        # One device (the CLI) against this process's 8: float32 sums in
        # another order, so equal to rounding of the largest sum; a mix of
        # two runs' statistics differs by O(1).
        np.testing.assert_allclose(got.arrays[site][stat], v, rtol=1e-5,
                                   atol=1e-6 * max(1.0, np.abs(v).max()),
                                   err_msg=f'{site}/{stat}')
    # The probe edited in place, its length kept.
    out2 = os.path.join(self.tmp, 'stats2')
    cmd = self._killed_collect(models, probe, out2)
    with open(probe) as f:
      text = f.read()
    with open(probe, 'w') as f:
      f.write(text.replace('w', 'v', 1))
    self.assertEqual(len(text), os.path.getsize(probe))
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=600)
    self.assertEqual(p.returncode, 2, p.stderr[-3000:])
    self.assertIn(f'{probe} changed since the interrupted run',
                  p.stderr.strip().splitlines()[-1])

  def test_finetune_resume_checks_inputs_and_every_field(self):
    paths = [os.path.join(self.tmp, f'm{i}') for i in range(2)]
    for i, d in enumerate(paths):
      testutil.make_tiny_hf(d, 'llama', seed=i)
    cfg, params = hf.load_hf_params(paths[0])
    _, other = hf.load_hf_params(paths[1])
    tok = testutil.make_tokenizer()
    probe = os.path.join(self.tmp, 'probe.jsonl')
    _write_probe(probe, n=8)
    dcfg = data.DataConfig(path=probe, max_seq_len=16, batch_size=2)
    batches, _ = data.load_batches(dcfg, tok)
    tc = finetune.TrainConfig(num_steps=2, save_every=1, batch_size=2,
                              max_seq_len=16, scope='full', lr=1e-3)
    work = os.path.join(self.tmp, 'ft')
    done = finetune.finetune(tc, params, cfg, batches, workdir=work)
    shuffled = batches[::-1]
    with self.assertRaisesRegex(ValueError, 'fine-tune batches changed since '
                                'the interrupted'):
      finetune.finetune(tc, params, cfg, shuffled, workdir=work)
    with self.assertRaisesRegex(ValueError, 'start params changed since'):
      finetune.finetune(tc, other, cfg, batches, workdir=work)
    with self.assertRaisesRegex(ValueError, r"changed train fields \['b2'\]"):
      finetune.finetune(dataclasses.replace(tc, b2=0.9), params, cfg,
                        batches, workdir=work)
    # Unchanged inputs, another log interval: resumes (at the end).
    again = finetune.finetune(dataclasses.replace(tc, log_every=1), params,
                              cfg, batches, workdir=work)
    for x, y in zip(jax.tree.leaves(again), jax.tree.leaves(done)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


_HOLD = textwrap.dedent('''
    import os, sys, time
    from act_jax.io import atomic
    kind = sys.argv[1]
    if kind == 'dir':
      with atomic.atomic_dir(sys.argv[2]) as tmp:
        open(os.path.join(tmp, 'half'), 'w').close()
        print('ready', flush=True)
        time.sleep(120)
    else:
      with atomic.hold_lock(sys.argv[2], 'x'):
        print('ready', flush=True)
        time.sleep(120)
''')


def _holder(*args):
  """A process that holds an output (or lock file) until killed."""
  p = subprocess.Popen([sys.executable, '-c', _HOLD, *args], cwd=REPO,
                       env=_env(), stdout=subprocess.PIPE, text=True)
  if p.stdout.readline().strip() != 'ready':
    raise AssertionError('the holder did not start')
  return p


class OneWriterTest(absltest.TestCase):
  """A second writer of an output fails at once, naming the first."""

  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp(prefix='safety_lock_')
    self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)

  def test_second_writer_of_an_output_fails_at_once(self):
    out = os.path.join(self.tmp, 'params')
    holder = _holder('dir', out)
    self.addCleanup(holder.kill)
    t0 = time.time()
    with self.assertRaisesRegex(RuntimeError, f'pid {holder.pid}'):
      with atomic.atomic_dir(out):
        pass
    self.assertLess(time.time() - t0, 5)
    # The first writer's temporary directory is intact.
    self.assertTrue(os.path.isfile(os.path.join(self.tmp, '.params.partial',
                                                'half')))
    holder.kill()
    holder.wait()
    with atomic.atomic_dir(out) as tmp:  # the lock died with its holder
      open(os.path.join(tmp, 'x'), 'w').close()
    self.assertEqual(sorted(os.listdir(out)), [atomic.MARKER, 'x'])

  def test_second_collect_to_the_same_out_fails_naming_the_first(self):
    models = [os.path.join(self.tmp, f'm{i}') for i in range(2)]
    for i, d in enumerate(models):
      testutil.make_tiny_hf(d, 'llama', seed=i)
    probe = os.path.join(self.tmp, 'probe.jsonl')
    _write_probe(probe)
    out = os.path.join(self.tmp, 'stats')
    args = ['--models=' + ','.join(models), f'--probe={probe}',
            f'--out={out}', f'--sites={SITES}', '--max_seq_len=24',
            '--batch_size=2', '--throttle_s=1']
    first = subprocess.Popen([sys.executable, '-m', 'act_jax.collect', *args],
                             cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    self.addCleanup(first.kill)
    lock, deadline = os.path.join(self.tmp, '.stats.lock'), time.time() + 120
    while not os.path.exists(lock) and time.time() < deadline:
      time.sleep(0.1)
    self.assertTrue(os.path.exists(lock), 'the first run took no lock')
    second = _cli('act_jax.collect', *args[:-1])
    self.assertEqual(second.returncode, 2, second.stderr[-2000:])
    self.assertIn(f'in use by another act-jax run (pid {first.pid}',
                  second.stderr.strip().splitlines()[-1])
    self.assertIsNone(first.poll())  # the first one goes on


class StrangerInputsTest(absltest.TestCase):
  """Files from someone else's checkpoint, data and templates."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp(prefix='safety_inputs_')
    cls.model = os.path.join(cls.tmp, 'm0')
    testutil.make_tiny_hf(cls.model, 'llama', seed=0)
    cls.other = os.path.join(cls.tmp, 'm1')
    testutil.make_tiny_hf(cls.other, 'llama', seed=1)
    cls.secret = os.path.join(cls.tmp, 'secret.json')
    with open(cls.secret, 'w') as f:
      json.dump({'ssh_key': 'SECRET'}, f)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def _copy(self, name):
    d = os.path.join(self.tmp, name)
    shutil.copytree(self.model, d)
    return d

  def test_symlinks_out_of_a_checkpoint_are_refused(self):
    aux = self._copy('aux_link')
    os.remove(os.path.join(aux, 'tokenizer_config.json'))
    os.symlink(self.secret, os.path.join(aux, 'tokenizer_config.json'))
    shard = self._copy('shard_link')
    os.remove(os.path.join(shard, 'model.safetensors'))
    os.symlink(os.path.join(self.other, 'model.safetensors'),
               os.path.join(shard, 'model.safetensors'))
    for src, name in ((aux, 'tokenizer_config.json'),
                      (shard, 'model.safetensors')):
      out = src + '_params'
      with self.assertRaisesRegex(ValueError, f'{name} is a symlink to '
                                  '.*outside the checkpoint'):
        convert.convert_hf_to_params(src, out)
      self.assertFalse(os.path.exists(out))
      convert.convert_hf_to_params(src, out, follow_symlinks=True)
    # The HF hub cache layout: snapshots/<rev>/<file> -> ../../blobs/<sha>.
    cache = os.path.join(self.tmp, 'models--x--y')
    snap = os.path.join(cache, 'snapshots', 'rev')
    os.makedirs(snap)
    os.makedirs(os.path.join(cache, 'blobs'))
    for f in os.listdir(self.model):
      shutil.copy(os.path.join(self.model, f),
                  os.path.join(cache, 'blobs', f))
      os.symlink(os.path.join('..', '..', 'blobs', f), os.path.join(snap, f))
    # For a snapshot, the repo's cache folder is the checkpoint: its blobs
    # need no flag (what a Hub id resolves to) ...
    convert.convert_hf_to_params(snap, snap + '_params')
    # ... but a snapshot file linking out of the repo folder is refused.
    os.remove(os.path.join(snap, 'tokenizer_config.json'))
    os.symlink(self.secret, os.path.join(snap, 'tokenizer_config.json'))
    with self.assertRaisesRegex(ValueError, 'follow_symlinks'):
      convert.convert_hf_to_params(snap, snap + '_params2')
    self.assertFalse(os.path.exists(snap + '_params2'))
    # A link that stays inside the checkpoint is fine without the flag.
    inside = self._copy('inside_link')
    os.rename(os.path.join(inside, 'model.safetensors'),
              os.path.join(inside, 'weights.bin'))
    os.symlink('weights.bin', os.path.join(inside, 'model.safetensors'))
    convert.convert_hf_to_params(inside, inside + '_params')

  def test_exports_drop_code_references(self):
    src = self._copy('auto_map')
    path = os.path.join(src, 'tokenizer_config.json')
    with open(path) as f:
      tc = json.load(f)
    tc['auto_map'] = {'AutoTokenizer': ['evil.EvilTokenizer', None]}
    with open(path, 'w') as f:
      json.dump(tc, f)
    params_dir, hf_dir = src + '_params', src + '_hf'
    convert.convert_hf_to_params(src, params_dir)
    convert.convert_params_to_hf(params_dir, hf_dir)
    for d in (params_dir, hf_dir):
      with open(os.path.join(d, 'tokenizer_config.json')) as f:
        got = json.load(f)
      self.assertNotIn('auto_map', got)
      self.assertEqual(got['eos_token'], tc['eos_token'])

  def test_errors_say_what_to_fix(self):
    models = [self.model, self.other]
    run = lambda **kw: collect_cli.run_cli(_collect_flags(
        models=models, out=os.path.join(self.tmp, 'never'), **kw))
    good = os.path.join(self.tmp, 'good.jsonl')
    _write_probe(good)
    # Numeric flags, before anything is read.
    for flag, value in (('batch_size', 0), ('max_seq_len', 0),
                        ('num_probe', -1)):
      with self.assertRaisesRegex(ValueError, f'--{flag}={value}: expected'):
        run(probe=good, **{flag: value})
    # The line of a bad JSON record, in .json as in .jsonl files.
    bad = os.path.join(self.tmp, 'bad.json')
    with open(bad, 'w') as f:
      f.write('{"text": "a"}\n{"text": "b"\n')
    with self.assertRaisesRegex(ValueError, r'bad\.json: line 2 is not JSON'):
      run(probe=bad)
    # The fields the first bad record really has.
    rec = os.path.join(self.tmp, 'records.json')
    with open(rec, 'w') as f:
      json.dump([{'text': 'a'}, {'other': 'b'}], f)
    with self.assertRaisesRegex(ValueError, r"record 2 has no field 'text'.*"
                                r"the fields \['other'\]$"):
      run(probe=rec)
    # A chat template that fails in jinja2 (syntax; the sandbox): one line
    # naming its file.
    chat = os.path.join(self.tmp, 'chat.jsonl')
    with open(chat, 'w') as f:
      f.write(json.dumps({'question': 'q', 'answer': 'a'}) + '\n')
    for template in ('{% for m in messages %}', "{{ ''.__class__.__mro__ }}"):
      tok = os.path.join(self.tmp, f'tok{len(template)}')
      testutil.make_tokenizer(tok, chat=True)
      with open(os.path.join(tok, 'chat_template.jinja'), 'w') as f:
        f.write(template)
      with self.assertRaisesRegex(ValueError, 'chat template of '
                                  f'{tok}/chat_template.jinja fails to render'):
        run(probe=chat, template='chat', tokenizer=tok)
    # Output writability and room, before heavy work.
    blocker = os.path.join(self.tmp, 'a_file')
    open(blocker, 'w').close()
    with self.assertRaisesRegex(ValueError, 'is not a folder'):
      collect_cli.run_cli(_collect_flags(models=models, probe=good,
                                         out=os.path.join(blocker, 'out')))
    with self.assertRaisesRegex(ValueError, 'needs about .* MiB free'):
      preflight.check_output_space(os.path.join(self.tmp, 'huge'), 2**62,
                                   '--out')

  def test_a_failed_write_ends_with_its_real_cause(self):
    out = os.path.join(self.tmp, 'too_large')
    # Files over 48 KiB cannot be written (EFBIG; Python ignores SIGXFSZ).
    p = subprocess.run(
        ['bash', '-c', 'ulimit -f 48 && exec "$0" "$@"', sys.executable,
         '-m', 'act_jax.convert', f'--hf_dir={self.model}',
         f'--params_dir={out}'], cwd=REPO, env=_env(), capture_output=True,
        text=True, timeout=600)
    self.assertEqual(p.returncode, 2, p.stderr[-3000:])
    last = p.stderr.strip().splitlines()[-1]
    self.assertRegex(last, r'^error: .*File too large')
    self.assertIn(out, last)
    self.assertFalse([n for n in os.listdir(self.tmp) if 'too_large' in n])


class PipelineTest(absltest.TestCase):
  """The stage runner: its workdir, stage reuse and resume by content."""

  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp(prefix='safety_runner_')
    self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)
    self.work = os.path.join(self.tmp, 'work')
    self.data = os.path.join(self.tmp, 'data.txt')  # stage a reads it
    self.extra = os.path.join(self.tmp, 'extra.txt')  # stage b reads it
    for path in (self.data, self.extra):
      with open(path, 'w') as f:
        f.write('one')
    self.calls = []

  def stages(self, fail_once=False, paths=True):
    def copy(ctx):
      self.calls.append('a')
      with open(self.data) as f:
        atomic.write_text(ctx.sub_dir('copy.txt'), f.read())

    def upper(ctx):
      self.calls.append(('b', ctx.sub_done('first.txt')))
      if not ctx.sub_done('first.txt'):
        atomic.write_text(ctx.sub_dir('first.txt'), 'started')
        if fail_once:
          raise KeyboardInterrupt('killed')
      with open(os.path.join(ctx.input_dir('a'), 'copy.txt')) as f:
        text = f.read()
      with open(self.extra) as f:
        text += f.read()
      atomic.write_text(ctx.sub_dir('upper.txt'), text.upper())

    kw = lambda p: {'paths': (p,)} if paths else {}
    return [runner.Stage('a', copy, snapshot={'x': 1}, **kw(self.data)),
            runner.Stage('b', upper, inputs=('a',), snapshot={'y': 1},
                         **kw(self.extra))]

  def read(self, stage, name):
    with open(os.path.join(self.work, stage, name)) as f:
      return f.read()

  def test_workdir_and_stage_folders_are_never_someone_elses(self):
    os.makedirs(self.work)
    with open(os.path.join(self.work, 'notes.txt'), 'w') as f:
      f.write('mine')
    with self.assertRaisesRegex(RuntimeError, 'not an act-jax workdir'):
      runner.run_stages(self.stages(paths=False), self.work)
    os.remove(os.path.join(self.work, 'notes.txt'))
    runner.run_stages(self.stages(paths=False), self.work)
    # A folder under a stage's name that no stage completed: someone's.
    os.remove(os.path.join(self.work, 'a', 'COMPLETE.json'))
    with open(os.path.join(self.work, 'a', 'notes.txt'), 'w') as f:
      f.write('mine')
    with self.assertRaisesRegex(RuntimeError, 'no stage completed it'):
      runner.run_stages(self.stages(paths=False), self.work)
    self.assertTrue(os.path.isfile(os.path.join(self.work, 'a',
                                                'notes.txt')))

  def test_a_changed_input_is_an_error_then_recomputed_with_overwrite(self):
    runner.run_stages(self.stages(), self.work)
    self.assertEqual(self.read('b', 'upper.txt'), 'ONEONE')
    with open(self.data, 'w') as f:
      f.write('two')
    with self.assertRaisesRegex(ValueError, f'{self.data} changed since it '
                                'was completed.*overwrite=True'):
      runner.run_stages(self.stages(), self.work)
    self.calls.clear()
    runner.run_stages(self.stages(), self.work, overwrite=True)
    self.assertEqual(self.calls, ['a', ('b', False)])  # b: its input 'a'
    self.assertEqual(self.read('b', 'upper.txt'), 'TWOONE')
    self.calls.clear()
    runner.run_stages(self.stages(), self.work)
    self.assertEqual(self.calls, [])  # all reused

  def test_an_interrupted_stage_resumes_only_unchanged_inputs(self):
    with self.assertRaises(KeyboardInterrupt):
      runner.run_stages(self.stages(fail_once=True), self.work)
    with open(self.extra, 'w') as f:
      f.write('two')
    with self.assertRaisesRegex(ValueError, f'{self.extra} changed since the '
                                'interrupted run.*restart=True'):
      runner.run_stages(self.stages(), self.work)
    with open(self.extra, 'w') as f:
      f.write('one')  # back as it was: it resumes
    self.calls.clear()
    runner.run_stages(self.stages(), self.work)
    self.assertEqual(self.calls, [('b', True)])
    self.assertEqual(self.read('b', 'upper.txt'), 'ONEONE')
    # restart discards the interrupted work instead.
    self.work = os.path.join(self.tmp, 'work2')
    with self.assertRaises(KeyboardInterrupt):
      runner.run_stages(self.stages(fail_once=True), self.work)
    self.calls.clear()
    runner.run_stages(self.stages(), self.work, restart=True)
    self.assertEqual(self.calls, [('b', False)])
    self.assertEqual(self.read('b', 'upper.txt'), 'ONEONE')

  def test_a_second_run_on_the_workdir_fails_naming_the_first(self):
    os.makedirs(self.work)
    atomic.write_marker(self.work, 'workdir')  # the first run's workdir
    holder = _holder('lock', os.path.join(self.work, '.lock'))
    self.addCleanup(holder.kill)
    with self.assertRaisesRegex(RuntimeError, f'pid {holder.pid}'):
      runner.run_stages(self.stages(paths=False), self.work)

  def test_config_fields_overwrite_and_restart_are_booleans(self):
    c = ml_collections.ConfigDict(dict(jobs.default_config().to_dict(),
                                       overwrite='yes'))
    with self.assertRaisesRegex(ValueError,
                                'overwrite=.yes.: expected true/false'):
      jobs.plan_from_config(c, self.work)


if __name__ == '__main__':
  absltest.main()
