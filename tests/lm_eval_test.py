"""The lm-evaluation-harness adapter against lm_eval's own `hf` model.

Three tasks defined locally (multiple choice = loglikelihood, greedy
generation, rolling log-likelihood over windows shorter than the texts)
run through `lm_eval.simple_evaluate` once with act-jax's `ActJaxLM` and
once with lm_eval's PyTorch `HFLM` on the same tiny checkpoint: metrics and
every per-sample response must agree. Skipped when the `lm_eval` extra is
not installed.
"""

import json
import os
import tempfile

from absl.testing import absltest
import numpy as np

import testutil

try:
  import lm_eval  # pylint: disable=g-import-not-at-top
  from lm_eval import tasks as lm_tasks  # pylint: disable=g-import-not-at-top
  from lm_eval.models import huggingface as lm_hf  # pylint: disable=g-import-not-at-top
  from act_jax.eval import lm_eval_adapter  # pylint: disable=g-import-not-at-top
except ImportError:
  lm_eval = None

MAX_LENGTH = 16  # shorter than the texts: rolling windows are exercised


def _tasks(task_dir: str) -> list[str]:
  """Writes three lm_eval task YAMLs over one local JSONL file."""
  recs = [{'question': f'{a}+{b}=', 'choices': [str(a + b), str(a + b + 1),
                                                'x'],
           'label': 0, 'answer': str(a + b),
           'text': f'the sum of {a} and {b} is {a + b}, said the toy.'}
          for a in range(3) for b in range(2)]
  path = os.path.join(task_dir, 'toy.jsonl')
  with open(path, 'w') as f:
    f.write(''.join(json.dumps(r) + '\n' for r in recs))
  common = ('dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: '
            f'{path}\ntest_split: test\n')
  specs = {
      'toy_mc': ("output_type: multiple_choice\ndoc_to_text: '{{question}}'"
                 "\ndoc_to_choice: '{{choices}}'\ndoc_to_target: "
                 "'{{label}}'\nmetric_list:\n  - metric: acc\n"),
      'toy_gen': ("output_type: generate_until\ndoc_to_text: '{{question}}'"
                  "\ndoc_to_target: '{{answer}}'\ngeneration_kwargs:\n  "
                  "until: ['.']\n  max_gen_toks: 6\n  do_sample: false\n"
                  "metric_list:\n  - metric: exact_match\n"),
      'toy_ppl': ("output_type: loglikelihood_rolling\ndoc_to_text: "
                  "'{{text}}'\ndoc_to_target: '{{text}}'\nmetric_list:\n  - "
                  "metric: word_perplexity\n"),
  }
  for name, body in specs.items():
    with open(os.path.join(task_dir, name + '.yaml'), 'w') as f:
      f.write(f'task: {name}\n{common}{body}')
  return list(specs)


@absltest.skipIf(lm_eval is None, 'the lm_eval extra is not installed')
class LmEvalAdapterTest(absltest.TestCase):

  def test_adapter_agrees_with_lm_evals_hf_model(self):
    tmp = tempfile.mkdtemp()
    model = os.path.join(tmp, 'model')
    testutil.make_tiny_hf(model, seed=3)
    tasks = _tasks(tmp)
    manager = lm_tasks.TaskManager(include_path=tmp)
    ours = lm_eval_adapter.ActJaxLM(pretrained=model, max_length=MAX_LENGTH)
    theirs = lm_hf.HFLM(pretrained=model, dtype='float32', device='cpu',
                        max_length=MAX_LENGTH, batch_size=1)
    got, want = (lm_eval.simple_evaluate(
        model=m, tasks=tasks, task_manager=manager, log_samples=True)
                 for m in (ours, theirs))
    for task in tasks:
      for key, value in want['results'][task].items():
        if isinstance(value, float) and 'stderr' not in key:
          np.testing.assert_allclose(got['results'][task][key], value,
                                     rtol=1e-5, err_msg=f'{task} {key}')
      ours_s = [s['resps'] for s in got['samples'][task]]
      theirs_s = [s['resps'] for s in want['samples'][task]]
      self.assertLen(ours_s, 6)
      for a, b in zip(ours_s, theirs_s):
        for (x,), (y,) in zip(a, b):
          if task == 'toy_gen':
            self.assertEqual(x, y)
          elif task == 'toy_mc':
            self.assertEqual(x[1], y[1])  # greedy flag
            np.testing.assert_allclose(x[0], y[0], rtol=1e-4, atol=1e-4)
          else:
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)
    # The rolling task really spans several windows.
    self.assertGreater(len(ours.tok_encode('the sum of 0 and 0 is 0, said '
                                           'the toy.')), MAX_LENGTH)


if __name__ == '__main__':
  absltest.main()
