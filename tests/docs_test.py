"""Every file the code and the documents point at exists; the license is
the one setup.cfg declares."""

import configparser
import glob
import os
import re

from absl.testing import absltest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Names of files the pipeline writes into a workdir, and placeholders.
GENERATED = {'report.md', 'README.md', 'x.md', 'samples.jsonl'}
# Outputs of documented commands that have not been run yet: the strength
# study (configs/smollm2_strength.py; BUILD.md says it is not run). Remove an
# entry when its file lands.
NOT_YET_RUN = ('docs/results/smollm2_strength',)
PATH = re.compile(r'(?<![\w/.-])((?:act_jax|configs|docs|tests|examples|'
                  r'launch|benchmarks)/[\w./-]*\w)')
MD = re.compile(r'(?<![\w/.-])([\w./-]*\w\.md)\b')
BARE_PY = re.compile(r'`(\w+\.py)`')


def _sources():
  files = glob.glob(os.path.join(REPO, 'act_jax', '**', '*.py'),
                    recursive=True)
  files += glob.glob(os.path.join(REPO, 'configs', '*.py'))
  files += [os.path.join(REPO, n) for n in ('README.md', 'BUILD.md')]
  files += glob.glob(os.path.join(REPO, 'docs', '**', '*.md'), recursive=True)
  return files


class DocsTest(absltest.TestCase):

  def test_every_referenced_file_exists(self):
    missing = []
    for f in _sources():
      with open(f, encoding='utf-8') as fh:
        text = fh.read()
      rel = os.path.relpath(f, REPO)
      for ref in PATH.findall(text):
        ref = ref.rstrip('.').split(':')[0]
        if ('<' in ref or '{' in ref or os.path.basename(ref) in GENERATED
            or ref.startswith(NOT_YET_RUN)):
          continue
        # 'benchmarks/README' names benchmarks/README.md.
        if not any(os.path.exists(os.path.join(REPO, ref + ext))
                   for ext in ('', '.md')):
          missing.append(f'{rel}: {ref}')
      for ref in MD.findall(text):
        if os.path.basename(ref) in GENERATED or '/' in ref and ref.startswith(
            ('workdir', 'runs')) or ref.startswith(NOT_YET_RUN):
          continue
        if not (os.path.exists(os.path.join(REPO, ref)) or
                os.path.exists(os.path.join(os.path.dirname(f), ref))):
          missing.append(f'{rel}: {ref}')
    self.assertEqual(missing, [])

  def test_not_yet_run_lists_only_files_that_do_not_exist(self):
    landed = [p for p in NOT_YET_RUN
              if glob.glob(os.path.join(REPO, p) + '*')]
    self.assertEqual(landed, [], 'these outputs exist now: remove them from '
                     'NOT_YET_RUN')

  def test_build_md_names_modules_that_exist(self):
    names = {os.path.basename(p) for p in glob.glob(
        os.path.join(REPO, '**', '*.py'), recursive=True)}
    with open(os.path.join(REPO, 'BUILD.md'), encoding='utf-8') as f:
      found = set(BARE_PY.findall(f.read()))
    self.assertEqual(sorted(found - names), [])

  def test_license_is_the_declared_apache_2(self):
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, 'setup.cfg'))
    self.assertEqual(cfg['metadata']['license'], 'Apache-2.0')
    with open(os.path.join(REPO, 'LICENSE'), encoding='utf-8') as f:
      text = f.read()
    self.assertIn('Apache License\n                           Version 2.0, '
                  'January 2004', text)
    self.assertIn('END OF TERMS AND CONDITIONS', text)


if __name__ == '__main__':
  absltest.main()
