"""configs/recover.py's 7B advice is what benchmarks/plan_7b.py compiles.

The plan measures memory for one setting per device count; the config's
docstring tells users which flags to pass. Both come from one table here:
a change to either without the other fails.
"""

import importlib.util
import os
import re
import sys

from absl.testing import absltest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plan_module():
  path = os.path.join(REPO, 'benchmarks', 'plan_7b.py')
  spec = importlib.util.spec_from_file_location('plan_7b', path)
  mod = importlib.util.module_from_spec(spec)
  sys.path.insert(0, os.path.dirname(path))  # its bench_common import
  try:
    spec.loader.exec_module(mod)
  finally:
    sys.path.pop(0)
  return mod


def _advice() -> dict[int, dict[str, str]]:
  """{devices: {flag: value}} from the recover config's docstring."""
  with open(os.path.join(REPO, 'configs', 'recover.py')) as f:
    doc = f.read().split('"""')[1]
  block = doc[doc.index('Settings for 7B models'):]
  parts = re.split(r'\n  (?=TPU|8 x H100)', block)[1:]
  out = {}
  for part in parts:
    n = 32 if part.startswith('TPU') else 8
    out[n] = {k: v.rstrip(',.') for k, v in re.findall(
        r'--config\.([\w.]+)=([\w,.-]+)', part)}
  # The 8-device block says "same dtypes": it inherits the 32-chip flags
  # it does not set.
  out[8] = dict(out[32], **out[8])
  return out


class PlanAdviceTest(absltest.TestCase):

  def test_recover_advice_matches_the_compiled_plan(self):
    plans = _plan_module().PLANS
    advice = _advice()
    self.assertEqual(sorted(advice), sorted(plans))
    for devices, plan in plans.items():
      a, n = advice[devices], f'{devices} devices'
      self.assertEqual(a['mesh_shape'], ','.join(map(str, plan['mesh'])), n)
      self.assertEqual(int(a['collect.batch_size']), plan['collect_batch'], n)
      self.assertEqual(int(a['train.batch_size']), plan['train_batch'], n)
      self.assertEqual(int(a['evaluate.batch_size']), plan['eval_batch'], n)
      self.assertEqual(int(a['collect.max_seq_len']), plan['seq'], n)
      self.assertEqual(int(a['train.max_seq_len']), plan['seq'], n)
      self.assertEqual(a['train.remat'], plan['remat'], n)
      self.assertEqual(a['train.lean'], 'True', n)
      self.assertEqual(a['train.compute_dtype'], 'bfloat16', n)
      self.assertEqual(int(a.get('train.grad_accum', 1)), plan['grad_accum'],
                       n)


if __name__ == '__main__':
  absltest.main()
