"""The six holes a hostile probe found (issue 20), one regression test each.

1. `report.out` may never replace a file act-jax did not publish, nor lie
   inside or on an input (a model's config.json, a user's notes.md).
2. A folder is an act-jax workdir by its marker only (`*.partial` entries or
   a lone `.lock` prove nothing).
3. Lock files never follow links and never delete what they did not create.
4. Every file a stage reads is in its fingerprint (the dev split too): a
   stage that opens a data file its drift key does not cover fails.
5. The report stage has a drift key: a changed `report.title` (or report
   code) regenerates the report on rerun.
6. A JSONL record over the byte budget is a one-line error naming the file
   and line, raised while reading (before tokenization).
And a copied or moved workdir is reused (keys hold paths relative to it).
Plus the one-line errors of bad records (encoding, null, non-string).
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest
import ml_collections

from act_jax import data
from act_jax.io import atomic
from act_jax.io import inputs
from act_jax.pipeline import jobs
from act_jax.pipeline import preflight
from act_jax.pipeline import run as run_lib
from act_jax.pipeline import runner
from act_jax.pipeline import stages as stages_lib
import testutil

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')


def _tree(root):
  """{relative path: bytes} of every file under `root`."""
  out = {}
  for d, _, fs in os.walk(root):
    for f in fs:
      p = os.path.join(d, f)
      with open(p, 'rb') as fh:
        out[os.path.relpath(p, root)] = fh.read()
  return out


class RunnerHolesTest(absltest.TestCase):
  """Holes 2-4 and 6 at the level of the runner, locks and readers."""

  def setUp(self):
    super().setUp()
    self.tmp = tempfile.mkdtemp(prefix='holes_')
    self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)

  def test_keys_write_workdir_paths_relative_to_it(self):
    work = os.path.join(self.tmp, 'w')
    inside, outside = os.path.join(work, 'build_models', 'm'), '/elsewhere/m'
    self.assertEqual(runner.relative_to([work + '2'], work), [work + '2'])
    key = {'config': {'model': inside, 'other': outside},
           'inputs': {inside: {'digest': 'd'}}, 'code': None,
           'upstream': {}}
    rel = runner.relative_to(key, work)
    self.assertEqual(rel['config'], {'model': '<workdir>/build_models/m',
                                     'other': outside})
    self.assertEqual(list(rel['inputs']), ['<workdir>/build_models/m'])
    # An absolute key (an earlier version) still matches in place, and a
    # relative one matches wherever the workdir now is.
    self.assertIsNone(runner.key_change(key, rel, work))
    moved = runner.relative_to(json.loads(json.dumps(key).replace(
        work, os.path.join(self.tmp, 'v'))), os.path.join(self.tmp, 'v'))
    self.assertIsNone(runner.key_change(rel, moved, os.path.join(self.tmp,
                                                                 'v')))
    self.assertIsNotNone(runner.key_change(key, moved, os.path.join(
        self.tmp, 'v')))

  def _stage(self, read=None, paths=()):
    def body(ctx):
      if read:
        data.read_jsonl(read)
      atomic.write_text(ctx.sub_dir('out.txt'), 'x')
    return [runner.Stage('a', body, snapshot={'x': 1}, paths=paths)]

  def test_partial_entry_or_lone_lock_is_not_a_workdir(self):  # hole 2
    for extra in ('photo.jpg.partial', runner.LOCK):
      with self.subTest(extra=extra):
        user = tempfile.mkdtemp(dir=self.tmp)
        for name, text in ((extra, 'half'), ('report.md', 'my notes'),
                           ('results.json', '{"mine": 1}')):
          with open(os.path.join(user, name), 'w') as f:
            f.write(text)
        before = _tree(user)
        with self.assertRaisesRegex(runner.StageError,
                                    'not an act-jax workdir'):
          runner.run_stages(self._stage(), user)
        self.assertEqual(_tree(user), before)

  def test_a_lock_never_follows_a_link_nor_deletes_a_file(self):  # hole 3
    victim = os.path.join(self.tmp, 'victim.txt')
    with open(victim, 'w') as f:
      f.write('precious')
    out = os.path.join(self.tmp, 'st')
    os.symlink(victim, atomic.lock_file_of(out))
    with self.assertRaisesRegex(atomic.OutputError, 'symbolic link'):
      with atomic.output_lock(out):
        pass
    with open(victim) as f:
      self.assertEqual(f.read(), 'precious')
    # A regular file that is not a lock: refused, untouched.
    os.remove(atomic.lock_file_of(out))
    with open(atomic.lock_file_of(out), 'w') as f:
      f.write('my file\n')
    with self.assertRaisesRegex(atomic.OutputError, 'other content'):
      with atomic.output_lock(out):
        pass
    with open(atomic.lock_file_of(out)) as f:
      self.assertEqual(f.read(), 'my file\n')
    # A killed run's leftover lock (a pid): taken over, removed when let go.
    with open(atomic.lock_file_of(out), 'w') as f:
      f.write('12345\n')
    with atomic.output_lock(out):
      with open(atomic.lock_file_of(out)) as f:
        self.assertEqual(f.read(), f'{os.getpid()}\n')
    self.assertFalse(os.path.lexists(atomic.lock_file_of(out)))
    # A lock file it created itself is removed when it lets go.
    with atomic.output_lock(out):
      pass
    self.assertFalse(os.path.lexists(atomic.lock_file_of(out)))

  def test_the_workdir_lock_never_follows_a_link(self):  # hole 3
    victim = os.path.join(self.tmp, 'victim.txt')
    with open(victim, 'w') as f:
      f.write('precious')
    work = os.path.join(self.tmp, 'work')
    os.makedirs(work)
    atomic.write_marker(work, 'workdir')
    os.symlink(victim, os.path.join(work, runner.LOCK))
    with self.assertRaisesRegex(atomic.OutputError, 'symbolic link'):
      runner.run_stages(self._stage(), work)
    with open(victim) as f:
      self.assertEqual(f.read(), 'precious')

  def test_a_stage_reading_a_file_outside_its_key_fails(self):  # hole 4
    rec = os.path.join(self.tmp, 'dev.jsonl')
    with open(rec, 'w') as f:
      f.write('{"text": "a"}\n')
    with self.assertRaisesRegex(inputs.UndeclaredReadError,
                                "stage 'a' read .*dev.jsonl"):
      runner.run_stages(self._stage(read=rec),
                        os.path.join(self.tmp, 'w1'))
    # Declared: it runs, and a changed file is then a drift error.
    work = os.path.join(self.tmp, 'w2')
    runner.run_stages(self._stage(read=rec, paths=(rec,)), work)
    with open(rec, 'w') as f:
      f.write('{"text": "b"}\n')
    with self.assertRaisesRegex(inputs.InputChangedError, 'dev.jsonl changed'):
      runner.run_stages(self._stage(read=rec, paths=(rec,)), work)

  def test_evaluate_and_patch_fingerprint_every_split(self):  # hole 4
    c = testutil.load_config('demo.py', 'tiny')
    c.mode = 'recover'
    c.abilities.arithmetic.dev = os.path.join(self.tmp, 'arith_dev.jsonl')
    c.evaluate.split = 'test,dev'
    c.sweep.patch = 'act'
    plan = jobs.plan_from_config(c, os.path.join(self.tmp, 'w'))
    by_name = {s.name: s for s in stages_lib.make_stages(plan)}
    for name in ('evaluate', 'patch'):
      self.assertIn(c.abilities.arithmetic.dev, by_name[name].paths)
    self.assertTrue(by_name['report'].snapshot)
    self.assertTrue(by_name['report'].code)

  def test_a_huge_record_is_one_line_before_tokenizing(self):  # hole 6
    big = os.path.join(self.tmp, 'big.jsonl')
    with open(big, 'w') as f:
      f.write('{"text": "ok"}\n')
      f.write(json.dumps({'prompt': 'x' * (data.MAX_RECORD_BYTES + 10)}))
      f.write('\n')
    with self.assertRaisesRegex(data.DataError,
                                f'^{big}: line 2 is over {data.MAX_RECORD_BYTES}'
                                ' bytes'):
      data.read_jsonl(big)

  def test_bad_records_are_named_one_based(self):  # 7-8
    latin = os.path.join(self.tmp, 'latin1.jsonl')
    with open(latin, 'wb') as f:
      f.write(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with self.assertRaisesRegex(data.DataError,
                                'latin1.jsonl: line 2 is not UTF-8 '
                                r'\(byte offset 27\)'):
      data.read_jsonl(latin)
    cfg = data.DataConfig(template='text')
    with self.assertRaisesRegex(data.DataError,
                                "src: record 2 field 'text' is null"):
      data.check_fields([{'text': 'a'}, {'text': None}], cfg, 'src')
    with self.assertRaisesRegex(data.DataError,
                                "src: record 1: field 'text' is a list"):
      data.check_fields([{'text': ['a', 'b']}], cfg, 'src')

  def test_all_empty_probe_texts_are_an_error(self):  # 8
    tok = testutil.make_tokenizer()
    cfg = data.DataConfig(template='text', max_seq_len=16, batch_size=2)
    with self.assertRaisesRegex(data.DataError, 'no token to count in 3'):
      data.load_batches(cfg, tok, records=[{'text': ''}] * 3)
    batches, _ = data.load_batches(cfg, tok, records=[{'text': 'ab'}])
    self.assertTrue(batches[0]['token_mask_bt'].any())

  def test_a_changed_config_names_the_changed_fields(self):  # 8
    work = os.path.join(self.tmp, 'w')
    runner.run_stages(self._stage(), work)
    stage = [dataclasses.replace(self._stage()[0],
                                 snapshot={'x': 2, 'y': 'new'})]
    with self.assertRaisesRegex(runner.StageError,
                                r"different config \(x: 1 -> 2, y: "
                                r"'<unset>' -> 'new'\)"):
      runner.run_stages(stage, work)


def _tiny(work_dev: str) -> ml_collections.ConfigDict:
  """The tiny demo, recover only and small (as tests/faults_test.py), with
  a dev split outside the workdir."""
  c = testutil.load_config('demo.py', 'tiny')
  c.mode = 'recover'
  c.sweep.candidates = 'source,target'
  c.sweep.extra_rhos = ''
  c.case.base_steps, c.case.spec_steps = 4, 2
  c.case.num_probe = c.case.num_eval = 8
  c.case.num_sft = 16
  c.sft.num_records = 16
  c.evaluate.num_eval = 8
  c.report.bootstrap = 50
  c.report.plots = False
  for name in ('lang_a', 'lang_b', 'reverse'):  # dev = test: the workdir's
    c.abilities[name].dev = c.abilities[name].eval
  c.abilities.arithmetic.dev = work_dev  # outside the workdir
  c.evaluate.split = 'test,dev'
  return c


class PipelineHolesTest(absltest.TestCase):
  """Holes 1, 4 and 5 through `run_pipeline` on the tiny demo."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp(prefix='holes_pipe_')
    cls.work = os.path.join(cls.tmp, 'work')
    cls.dev = os.path.join(cls.tmp, 'dev.jsonl')
    # The dev split must exist before pre-flight: the case's arithmetic
    # records are only written by the build, so write a dev file of the
    # same form (prompt + answer) by hand.
    with open(cls.dev, 'w') as f:
      for a in range(10, 18):
        f.write(json.dumps({'prompt': f'{a}+11=', 'answer': str(a + 11)})
                + '\n')
    run_lib.run_pipeline(_tiny(cls.dev), cls.work)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def test_a_copied_or_moved_workdir_reuses_every_stage(self):  # 8
    moved = os.path.join(self.tmp, 'moved')
    shutil.copytree(self.work, moved, symlinks=True)
    self.addCleanup(shutil.rmtree, moved, ignore_errors=True)

    def marks():
      return {s: os.path.getmtime(os.path.join(moved, s, runner.MARKER))
              for s in os.listdir(moved)
              if os.path.isfile(os.path.join(moved, s, runner.MARKER))}

    before = marks()
    self.assertIn('evaluate', before)
    records = run_lib.run_pipeline(_tiny(self.dev), moved)
    self.assertEqual(marks(), before)  # nothing recomputed
    self.assertIn('<workdir>/build_models', json.dumps(records['evaluate']))
    self.assertNotIn(self.work, json.dumps(records['evaluate']['config']))

  def test_report_title_and_report_code_regenerate_the_report(self):  # 5
    c = _tiny(self.dev)
    c.report.title = 'A changed title'
    evaluated = runner.read_marker(self.work, 'evaluate')
    records = run_lib.run_pipeline(c, self.work)
    with open(os.path.join(self.work, 'report.md')) as f:
      self.assertStartsWith(f.read(), '# A changed title')
    self.assertEqual(runner.read_marker(self.work, 'evaluate'), evaluated)
    self.assertNotEqual(records['report']['config'],
                        records['evaluate']['config'])

  def test_report_out_never_replaces_an_input_or_a_user_file(self):  # 1
    model = os.path.join(self.work, 'build_models', 'base')
    config_json = os.path.join(model, 'config.json')
    notes = os.path.join(self.tmp, 'notes.md')
    os.makedirs(os.path.join(self.tmp, 'notes'), exist_ok=True)
    with open(notes, 'w') as f:
      f.write('my notes')
    before = _tree(model), _tree(os.path.join(self.tmp, 'notes'))
    for out, msg in ((config_json, 'lies inside an input'),
                     (notes, 'is not an act-jax report'),
                     (self.dev, 'is an input')):
      with self.subTest(out=out):
        c = _tiny(self.dev)
        c.report.out = out
        c.overwrite = out == notes  # not even with overwrite
        with self.assertRaisesRegex(preflight.PreflightError, msg):
          run_lib.run_pipeline(c, self.work)
    self.assertEqual((_tree(model), _tree(os.path.join(self.tmp, 'notes'))),
                     before)
    with open(notes) as f:
      self.assertEqual(f.read(), 'my notes')
    # A fresh path is published with the marker, and a rerun of the same
    # workdir may replace what it published.
    pub = os.path.join(self.tmp, 'pub', 'report.md')
    os.makedirs(os.path.dirname(pub))
    c = _tiny(self.dev)
    c.report.out = pub
    run_lib.run_pipeline(c, self.work)
    c.report.title = 'Published twice'
    run_lib.run_pipeline(c, self.work)
    with open(pub) as f:
      self.assertEqual(f.readline().strip(), atomic.file_marker('report'))
      self.assertIn('# Published twice', f.read())

  def test_a_changed_dev_file_is_not_reused(self):  # hole 4
    with open(self.dev) as f:
      original = f.read()

    def restore():
      with open(self.dev, 'w') as f:
        f.write(original)

    self.addCleanup(restore)
    with open(self.dev, 'w') as f:
      f.write(original.replace('"answer": "', '"answer": "9'))
    for overwrite in (False, True):
      with self.subTest(overwrite=overwrite):
        c = _tiny(self.dev)
        c.overwrite = overwrite
        if overwrite:  # recomputed, with the new answers
          run_lib.run_pipeline(c, self.work)
          rows = json.load(open(os.path.join(self.work, 'evaluate',
                                             'recover', 'target.json')))
          self.assertIn('dev', json.dumps(rows))
        else:
          with self.assertRaisesRegex(inputs.InputChangedError,
                                      'dev.jsonl changed since it was '
                                      'completed'):
            run_lib.run_pipeline(c, self.work)
    restore()
    c = _tiny(self.dev)
    c.overwrite = True
    run_lib.run_pipeline(c, self.work)


class CliLinesTest(absltest.TestCase):
  """Item 7: a bad config key, a missing config file and --help through
  `python -m act_jax.main` as a user runs it: one line, a useful exit."""

  def test_bad_keys_missing_file_and_help(self):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tmp = tempfile.mkdtemp(prefix='holes_cli_')
    self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
    env = dict(os.environ, JAX_PLATFORMS='cpu', HF_HUB_OFFLINE='1')
    env.pop('XLA_FLAGS', None)
    work = '--workdir=' + os.path.join(tmp, 'w')
    tiny = '--config=configs/demo.py:tiny'
    cases = (
        ((tiny, work, '--config.collect.batchsize=4'),
         "no config field 'batchsize'; did you mean 'batch_size'"),
        ((tiny, work, '--config.colect.batch_size=4'),
         "no config field 'colect'; did you mean 'collect'"),
        ((tiny, work, '--config.abilities.abilty.probe=x'),
         "no config field 'abilty'"),
        (('--config=nonexist.py', work), '--config=nonexist.py: no such file'),
    )
    for args, msg in cases:
      with self.subTest(args=args[-1]):
        p = subprocess.run([sys.executable, '-m', 'act_jax.main', *args],
                           cwd=repo, env=env, capture_output=True, text=True,
                           timeout=300, check=False)
        self.assertNotEqual(p.returncode, 0)
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        self.assertIn(msg, lines[-1])
        self.assertNotIn('Traceback', p.stderr)
        self.assertFalse(os.path.exists(os.path.join(tmp, 'w')))
    for flag, want in (('--help', 'help_config'),
                       ('--help_config', 'collect.batch_size')):
      with self.subTest(flag=flag):
        p = subprocess.run([sys.executable, '-m', 'act_jax.main', flag,
                            tiny], cwd=repo, env=env, capture_output=True,
                           text=True, timeout=300, check=False)
        self.assertEqual(p.returncode, 0, p.stderr[-2000:])
        self.assertIn(want, p.stdout + p.stderr)


if __name__ == '__main__':
  absltest.main()
