"""io/inputs.py and io/atomic.py in isolation: fingerprints and their cache,
the symlink rule, markers, locks, leftovers of killed writers, failpoints."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest

import testutil
from act_jax.io import atomic
from act_jax.io import faults
from act_jax.io import inputs
from act_jax.io import models as models_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FingerprintTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.src = tempfile.mkdtemp(prefix='inputs_test_model_')
    testutil.make_tiny_hf(cls.src, 'llama', seed=0)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.src, ignore_errors=True)
    super().tearDownClass()

  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp(prefix='inputs_test_')
    self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)
    self.model = os.path.join(self.tmp, 'm')
    shutil.copytree(self.src, self.model)
    # Older than the racy window, so digests are cached.
    past = time.time() - 60
    for f in os.listdir(self.model):
      os.utime(os.path.join(self.model, f), (past, past))

  def test_cache_is_used_while_stats_match_and_dropped_after_a_write(self):
    first = models_io.model_fingerprint(self.model)
    self.assertEqual(sorted(first['files']),
                     ['config.json', 'generation_config.json',
                      'model.safetensors', 'tokenizer.json',
                      'tokenizer_config.json'])
    header, data = first['files']['model.safetensors'].split(':')
    self.assertLen(data, 64)
    cache = os.path.join(self.model, inputs.CACHE_FILE)
    with open(cache) as f:
      entries = json.load(f)['files']
    # A forged cached digest is returned while size/mtime/ctime/inode match:
    # proof that the cache, not the bytes, answered.
    entries['config.json']['digest'] = 'forged'
    atomic.write_json(cache, {'format': inputs.CACHE_FORMAT,
                              'files': entries})
    self.assertEqual(models_io.model_fingerprint(self.model)['files'][
        'config.json'], 'forged')
    # Rewrite the weights with other values, same size: recomputed.
    path = os.path.join(self.model, 'model.safetensors')
    with open(path, 'r+b') as f:
      f.seek(-8, os.SEEK_END)
      f.write(b'\x01' * 8)
    now = models_io.model_fingerprint(self.model)['files']['model.safetensors']
    self.assertNotEqual(now, first['files']['model.safetensors'])
    self.assertEqual(now.split(':')[0], header)  # same names and shapes
    self.assertEqual(inputs.first_change({self.model: first},
                                         {self.model: {'files': {
                                             **first['files'],
                                             'model.safetensors': now}}}),
                     os.path.join(self.model, 'model.safetensors'))

  def test_no_cache_where_it_cannot_be_written(self):
    os.makedirs(os.path.join(self.model, inputs.CACHE_FILE))  # unwritable
    a = models_io.model_fingerprint(self.model)
    b = models_io.model_fingerprint(self.model)
    self.assertEqual(a, b)
    self.assertTrue(os.path.isdir(os.path.join(self.model,
                                               inputs.CACHE_FILE)))

  def test_symlink_rule(self):
    outside = os.path.join(self.tmp, 'outside.txt')
    open(outside, 'w').close()
    os.symlink(outside, os.path.join(self.model, 'vocab.json'))
    with self.assertRaisesRegex(inputs.UnsafeInputError,
                                'vocab.json is a symlink to .*outside'):
      models_io.model_fingerprint(self.model)
    self.assertIn('vocab.json', models_io.model_fingerprint(
        self.model, follow_symlinks=True)['files'])
    # The checkpoint dir itself may be a link.
    link = os.path.join(self.tmp, 'link')
    os.remove(os.path.join(self.model, 'vocab.json'))
    os.symlink(self.model, link)
    self.assertEqual(inputs.resolve_inside(link, 'config.json'),
                     os.path.join(link, 'config.json'))

  def test_data_fingerprint(self):
    path = os.path.join(self.tmp, 'd.jsonl')
    with open(path, 'w') as f:
      f.write('{"text": "abc"}\n')
    a = inputs.data_fingerprint(path)
    with open(path, 'w') as f:
      f.write('{"text": "abd"}\n')  # same length
    self.assertNotEqual(a, inputs.data_fingerprint(path))
    self.assertEqual(inputs.data_fingerprint('org/name'),
                     {'digest': 'name:org/name'})


class AtomicTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp(prefix='atomic_test_')
    self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)

  def test_replace_only_act_jax_artifacts_of_the_same_kind(self):
    out = os.path.join(self.tmp, 'out')
    with atomic.atomic_dir(out, kind='stats') as tmp:
      open(os.path.join(tmp, 'a'), 'w').close()
    self.assertEqual(atomic.read_marker(out)['kind'], 'stats')
    with self.assertRaisesRegex(atomic.OutputError, 'holds an act-jax stats'):
      with atomic.atomic_dir(out, overwrite=True, kind='params'):
        pass
    with atomic.atomic_dir(out, overwrite=True, kind='stats') as tmp:
      open(os.path.join(tmp, 'b'), 'w').close()
    self.assertEqual(sorted(os.listdir(out)), [atomic.MARKER, 'b'])
    self.assertEqual(sorted(os.listdir(self.tmp)), ['out'])
    with self.assertRaisesRegex(atomic.OutputError, 'is an input'):
      atomic.check_output(out, 'stats', overwrite=True, inputs=[out])

  def test_locks_are_reentrant_and_named(self):
    lock = os.path.join(self.tmp, 'x.lock')
    with atomic.hold_lock(lock, 'x'):
      with atomic.hold_lock(lock, 'x'):
        with open(lock) as f:
          self.assertEqual(f.read().strip(), str(os.getpid()))
    self.assertFalse(os.path.exists(lock))
    out = os.path.join(self.tmp, 'out')
    with atomic.output_lock(self.tmp + '/'):
      # Guarded by the lock of a folder above: no lock file of its own.
      with atomic.output_lock(out):
        self.assertFalse(os.path.exists(atomic.lock_file_of(out)))

  def test_leftovers_of_a_killed_writer_are_undone(self):
    out = os.path.join(self.tmp, 'out')
    with atomic.atomic_dir(out, collective=False) as tmp:
      open(os.path.join(tmp, 'v1'), 'w').close()
    script = (
        'import os, sys\n'
        'from act_jax.io import atomic\n'
        'with atomic.atomic_dir(sys.argv[1], overwrite=True,\n'
        '                       collective=False) as tmp:\n'
        '  open(os.path.join(tmp, "v2"), "w").close()\n'
        'with atomic.atomic_file(sys.argv[1] + ".json") as tmp:\n'
        '  open(tmp, "w").close()\n')
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
    left = lambda: sorted(n for n in os.listdir(self.tmp) if n != 'out')
    for point, prefix in (('atomic.before_rename~out', '.out.partial-'),
                          ('atomic.before_rename~json', '.out.json.tmp-')):
      env[faults.FAILPOINT_ENV] = point
      p = subprocess.run([sys.executable, '-c', script, out], env=env,
                         capture_output=True, text=True, timeout=120)
      self.assertEqual(p.returncode, -signal.SIGKILL, p.stderr[-2000:])
      # Only this kill's temporary: the next writer removed the last one.
      self.assertLen(left(), 1)
      self.assertTrue(left()[0].startswith(prefix), left())
    self.assertEqual(sorted(os.listdir(out)), [atomic.MARKER, 'v2'])
    with atomic.atomic_dir(out, overwrite=True, collective=False) as tmp:
      open(os.path.join(tmp, 'v3'), 'w').close()
    atomic.write_text(out + '.json', '{}')
    self.assertEqual(sorted(os.listdir(self.tmp)), ['out', 'out.json'])
    self.assertEqual(sorted(os.listdir(out)), [atomic.MARKER, 'v3'])

  def test_a_replace_killed_halfway_puts_the_old_artifact_back(self):
    out = os.path.join(self.tmp, 'out')
    with atomic.atomic_dir(out, collective=False) as tmp:
      open(os.path.join(tmp, 'v1'), 'w').close()
    # What a writer killed between its two renames leaves (pid 2**22 + 1 is
    # above Linux's pid_max, so no live process has it).
    old = os.path.join(self.tmp,
                       f'.out.old-{socket.gethostname()}-4194305-abcd')
    os.rename(out, old)
    # The next writer puts it back first (and then finds it exists).
    with self.assertRaisesRegex(atomic.OutputError, 'already exists'):
      with atomic.atomic_dir(out, collective=False):
        pass
    self.assertTrue(os.path.isfile(os.path.join(out, 'v1')))
    self.assertFalse(os.path.exists(old))


if __name__ == '__main__':
  absltest.main()
