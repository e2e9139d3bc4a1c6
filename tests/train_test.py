"""Tests for finetune.py: learning, resume after SIGKILL, NaN stop, bad input."""

import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time

from absl.testing import absltest
import jax
import numpy as np
import orbax.checkpoint as ocp

from act_jax import data
from act_jax.model import forward
from act_jax.train import optim
from act_jax.model import sharding
from act_jax.train import finetune
from tests import testutil
from tests.optim_test import CFG, channel_mask, tcfg, toy_batches

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUN_SCRIPT = textwrap.dedent('''
    import os, sys, time
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
    import jax
    jax.config.update('jax_num_cpu_devices', 8)
    jax.config.update('jax_default_matmul_precision', 'highest')
    import numpy as np
    sys.path.insert(0, {repo!r})
    from act_jax.model import forward
    from act_jax.train import finetune
    from tests.optim_test import CFG, channel_mask, tcfg, toy_batches
    workdir, out, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    batches = toy_batches(5)
    def batch_fn(step):  # deterministic by step
      time.sleep(delay)
      return batches[(step * 3) % 5]
    params = forward.init_params(CFG, jax.random.key(0))
    p = finetune.finetune(tcfg(num_steps=10, save_every=2, log_every=1), params,
                       CFG, batch_fn, mask=channel_mask(), workdir=workdir)
    np.savez(out + '.tmp.npz', *[np.asarray(x) for x in jax.tree.leaves(p)])
    os.replace(out + '.tmp.npz', out)
''')


def _tb_scalars(path):
  """(step, tag, value) of a TensorBoard event file: TFRecord framing
  (u64 length, u32 crc, data, u32 crc) of Event protos."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  with open(path, 'rb') as f:
    raw = f.read()
  out, i = [], 0
  while i < len(raw):
    (n,) = struct.unpack_from('<Q', raw, i)
    ev = event_pb2.Event.FromString(raw[i + 12:i + 12 + n])
    i += 12 + n + 4
    out += [(ev.step, v.tag, v.simple_value) for v in ev.summary.value]
  return out


def _ckpt_steps(workdir):
  d = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


class TrainTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.params = jax.device_get(forward.init_params(CFG, jax.random.key(0)))

  def _fresh(self):
    return jax.tree.map(np.copy, self.params)

  def test_kill_and_resume_gives_same_params(self):
    tmp = tempfile.mkdtemp()
    script = os.path.join(tmp, 'run.py')
    with open(script, 'w') as f:
      f.write(RUN_SCRIPT.format(repo=REPO))
    env = dict(os.environ, PYTHONPATH=REPO)
    ref_dir, ref_out = os.path.join(tmp, 'ref'), os.path.join(tmp, 'ref.npz')
    run_dir, run_out = os.path.join(tmp, 'run'), os.path.join(tmp, 'run.npz')
    ref = subprocess.Popen([sys.executable, script, ref_dir, ref_out, '0'],
                           env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
    victim = subprocess.Popen([sys.executable, script, run_dir, run_out,
                               '1.0'], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not _ckpt_steps(run_dir) and time.time() < deadline:
      self.assertIsNone(victim.poll(), 'run ended before a checkpoint')
      time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = _ckpt_steps(run_dir)
    self.assertNotEmpty(killed_at)
    self.assertLess(max(killed_at), 10)
    self.assertFalse(os.path.exists(run_out))
    rerun = subprocess.run([sys.executable, script, run_dir, run_out, '0'],
                           env=env, capture_output=True, text=True,
                           timeout=300, check=False)
    self.assertEqual(rerun.returncode, 0, rerun.stderr[-3000:])
    _, err = ref.communicate(timeout=300)
    self.assertEqual(ref.returncode, 0, err[-3000:])
    a, b = np.load(ref_out), np.load(run_out)
    self.assertLen(a.files, len(jax.tree.leaves(self.params)))
    for k in a.files:
      np.testing.assert_array_equal(a[k], b[k])
    # the resumed segment restarted after the checkpoint, not from 0
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
      steps = [json.loads(line)['step'] for line in f]
    self.assertEqual(steps[-10 + max(killed_at):], list(
        range(max(killed_at) + 1, 11)))
    self.assertLess(len(steps), 20)

  def test_loss_falls_with_metrics_and_accum(self):
    workdir = tempfile.mkdtemp()
    tc = tcfg(scope='full', num_steps=30, lr=1e-2, weight_decay=0.0,
              grad_accum=2, save_every=0, log_every=10)
    finetune.finetune(tc, self._fresh(), CFG, toy_batches(6), workdir=workdir)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      rows = [json.loads(line) for line in f]
    self.assertEqual([r['step'] for r in rows], list(range(1, 31)))
    first, last = rows[0]['loss'], np.mean([r['loss'] for r in rows[-3:]])
    self.assertLess(last, 0.5 * first)
    self.assertTrue(all(r['tokens_per_s'] > 0 for r in rows))
    tb_dir = os.path.join(workdir, 'tb')
    events = _tb_scalars(os.path.join(tb_dir, os.listdir(tb_dir)[0]))
    tb_loss = [v for s, t, v in events if t == 'loss']
    np.testing.assert_allclose(tb_loss, [r['loss'] for r in rows], rtol=1e-6)
    self.assertEqual(_ckpt_steps(workdir), [30])  # final save

  def test_grad_accum_and_bf16(self):
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    runs = {}
    for accum, dt in ((1, 'float32'), (2, 'float32'), (1, 'bfloat16')):
      tc = tcfg(num_steps=3, grad_accum=accum, compute_dtype=dt)
      given = jax.device_put(self._fresh(), jax.devices()[0])
      runs[(accum, dt)] = jax.device_get(finetune.finetune(
          tc, given, CFG, toy_batches(3), mask=channel_mask(),
          mesh=mesh))
      # The step donates buffers; the caller's params must survive intact.
      for a, b in zip(jax.tree.leaves(jax.device_get(given)),
                      jax.tree.leaves(jax.device_get(self._fresh()))):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(runs[(1, 'float32')]),
                    jax.tree.leaves(runs[(2, 'float32')])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    bf = runs[(1, 'bfloat16')]
    self.assertTrue(all(x.dtype == np.float32 for x in jax.tree.leaves(bf)))
    q0 = self.params['layers']['self_attn']['q_proj']['kernel']
    q = bf['layers']['self_attn']['q_proj']['kernel']
    self.assertTrue(np.isfinite(q).all() and (q != q0).any())

  def test_sharded_matches_single_device(self):
    mesh = sharding.make_mesh((2, 2, 2))
    tc = tcfg(num_steps=2, scope='modules')
    opt = optim.make_optimizer(tc, self.params, channel_mask())
    psh = sharding.tree_shardings(mesh, forward.logical_axes(CFG),
                                  self.params)
    ssh = finetune._state_shardings(mesh, opt.tx, self.params, psh)
    specs = {str(s.spec) for s in jax.tree.leaves(ssh)}
    self.assertIn("P(None, 'fsdp', 'tensor')", specs)  # moments follow params
    out = finetune.finetune(tc, self._fresh(), CFG, toy_batches(2),
                            mask=channel_mask(), mesh=mesh)
    self.assertEqual(
        str(out['layers']['self_attn']['q_proj']['kernel'].sharding.spec),
        "P(None, 'fsdp', 'tensor')")
    one = finetune.finetune(tc, self._fresh(), CFG, toy_batches(2),
                            mask=channel_mask(), mesh=sharding.make_mesh(
                             (1, 1, 1), devices=jax.devices()[:1]))
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(one)):
      # Adam normalizes tiny gradients, so summation-order noise shows at
      # about lr * 1e-4.
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                 atol=1e-5)

  def test_nan_stops_and_keeps_last_good_checkpoint(self):
    workdir = tempfile.mkdtemp()
    tc = tcfg(scope='full', num_steps=6, lr=1e38, warmup_frac=0.0,
              schedule='constant', clip_norm=0.0, save_every=1)
    with self.assertRaisesRegex(finetune.TrainingDivergedError,
                                r'non-finite loss .* in step 2 of 6.*last '
                                r'good checkpoint: step 1'):
      finetune.finetune(tc, self._fresh(), CFG, toy_batches(3), workdir=workdir)
    self.assertEqual(_ckpt_steps(workdir), [1])
    mgr = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
    restored = mgr.restore(1, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    self.assertEqual(restored['meta']['step'], 1)
    self.assertTrue(all(np.isfinite(x).all() for x in
                        jax.tree.leaves(restored['state']['params'])))

  def test_bad_input_errors(self):
    tc = tcfg(num_steps=2)
    with self.assertRaisesRegex(ValueError, 'fine-tune set is empty'):
      finetune.finetune(tc, self.params, CFG, [], mask=channel_mask())
    with self.assertRaisesRegex(ValueError, 'fine-tune set is empty'):
      finetune.finetune(tc, self.params, CFG, iter([]), mask=channel_mask())
    long = toy_batches(1, length=16)
    with self.assertRaisesRegex(ValueError, r'length 16 > '
                                r'train.max_seq_len=12 \(8 sequences'):
      finetune.finetune(tc, self.params, CFG, long, mask=channel_mask())
    src = finetune.BatchSource(long, tcfg(overlength='truncate'), CFG.vocab_size)
    self.assertEqual(src.get(0)['tokens_bt'].shape, (8, 12))
    self.assertEqual(src.num_truncated, 8)
    bad = dict(toy_batches(1)[0])
    bad['tokens_bt'] = bad['tokens_bt'] + 100
    with self.assertRaisesRegex(ValueError, 'outside the vocabulary'):
      finetune.finetune(tc, self.params, CFG, [bad], mask=channel_mask())
    with self.assertRaisesRegex(ValueError, r"missing keys \['loss_mask_bt'\]"):
      finetune.finetune(tc, self.params, CFG, [{
          'tokens_bt': bad['tokens_bt'], 'attention_mask_bt':
              bad['attention_mask_bt']}], mask=channel_mask())
    with self.assertRaisesRegex(ValueError, 'unknown fields'):
      finetune.check_train_config({'num_step': 3})
    with self.assertRaisesRegex(ValueError, 'grad_accum'):
      finetune.check_train_config(tcfg(grad_accum=3))

  def test_sft_batches_via_data(self):
    tok = testutil.make_tokenizer()
    # What the pipeline's SFT rendering asks of data.py (stages.data_config).
    dcfg = data.DataConfig(template='qa', prompt_field='question',
                           response_field='answer', max_seq_len=32,
                           batch_size=2, add_eos=True, loss_on='response')
    recs = [{'question': 'a+b?', 'answer': 'ab'},
            {'question': 'c?', 'answer': 'cc'}]
    batches, info = data.load_batches(dcfg, tok, recs)
    self.assertEqual(info['loss_on'], 'response')
    b = batches[0]
    # loss only on response tokens (+ EOS); prompt tokens carry none
    self.assertEqual(int(b['token_mask_bt'][0].sum()), 3)
    text_ids = tok('Question: a+b?\nAnswer: ab')['input_ids']
    self.assertEqual(int(b['attention_mask_bt'][0].sum()), len(text_ids) + 1)
    self.assertEqual(b['tokens_bt'][0, len(text_ids)], tok.eos_token_id)
    with self.assertRaisesRegex(data.DataError, "no field 'answer'"):
      data.load_batches(dcfg, tok, [{'question': 'x'}])
    with self.assertRaisesRegex(data.DataError, 'empty'):
      data.load_batches(dcfg, tok, [])
    with self.assertRaisesRegex(data.DataError, 'max_seq_len'):
      data.load_batches(data.DataConfig(
          template='qa', prompt_field='question', response_field='answer',
          max_seq_len=8, overflow='error'), tok, recs)


if __name__ == '__main__':
  absltest.main()
