"""Sharded forward on an 8-device CPU mesh (data x fsdp x tensor = 2x2x2).

Params are converted straight onto their NamedShardings, the batch is
sharded over data/fsdp, and `jax.jit` runs with explicit in/out shardings
inside `sharding.activation_sharding(mesh)`; logits must equal the
unsharded forward. The vocab (99) does not divide the tensor axis, so it is
replicated rather than failing.
"""

import shutil
import tempfile

from absl.testing import absltest
import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import testutil

from act_jax.model import forward
from act_jax.io import hf
from act_jax.model import sharding

VOCAB = 99  # odd: cannot be split over tensor=2
BATCH, LENGTH = 4, 16


class ShardedForwardTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp(prefix='sharding_test_')
    testutil.make_tiny_hf(cls.root, 'qwen2', tokenizer=False,
                          vocab_size=VOCAB)
    cls.mesh = sharding.make_mesh((2, 2, 2))

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  def test_sharded_forward_equals_unsharded(self):
    mesh = self.mesh
    cfg, params = hf.load_hf_params(self.root)
    cfg_s, params_s = hf.load_hf_params(self.root, mesh=mesh)
    self.assertEqual(cfg, cfg_s)
    shardings = sharding.tree_shardings(mesh, forward.logical_axes(cfg),
                                        forward.abstract_params(cfg))
    jax.tree.map(lambda x, s: self.assertEqual(x.sharding, s), params_s,
                 shardings)
    # Sharded where it divides, replicated where it does not (vocab 99).
    self.assertEqual(params_s['embed_tokens']['embedding'].sharding.spec,
                     P(None, 'fsdp'))
    self.assertEqual(
        params_s['layers']['mlp']['up_proj']['kernel'].sharding.spec,
        P(None, 'fsdp', 'tensor'))

    tokens = testutil.random_tokens(BATCH, LENGTH, VOCAB, seed=2)
    mask = np.ones((BATCH, LENGTH), np.int32)
    mask[1, 11:] = 0
    mask[3, :4] = 0
    batch_sharding = sharding.named_sharding(mesh, ('batch', 'length'),
                                             tokens.shape)
    self.assertEqual(batch_sharding.spec, P(('data', 'fsdp'), None))
    out_sharding = sharding.named_sharding(
        mesh, ('batch', 'length', 'vocab'), (BATCH, LENGTH, VOCAB))

    def logits_fn(p, t, m):
      return forward.apply(p, t, cfg, attention_mask_bt=m).logits

    sharded_fn = jax.jit(logits_fn,
                         in_shardings=(shardings, batch_sharding,
                                       batch_sharding),
                         out_shardings=out_sharding)
    with sharding.activation_sharding(mesh):
      got = sharded_fn(params_s, jax.device_put(tokens, batch_sharding),
                       jax.device_put(mask, batch_sharding))
    self.assertEqual(got.sharding, out_sharding)
    self.assertLen(got.addressable_shards, 8)
    want = jax.jit(logits_fn)(params, tokens, mask)
    got, want = np.asarray(got)[mask == 1], np.asarray(want)[mask == 1]
    diff = np.abs(got - want).max()
    print(f'sharded vs unsharded: max |logit diff| = {diff:.2e} '
          f'(max |logit| {np.abs(want).max():.1f})')
    # Sharded matmuls sum in another order: float32 rounding only.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  def test_non_dividing_dims_are_replicated(self):
    mesh = self.mesh
    self.assertEqual(
        sharding.named_sharding(mesh, ('batch', 'embed'), (3, 64)).spec,
        P(None, 'fsdp'))
    self.assertEqual(
        sharding.named_sharding(mesh, ('embed', 'heads'), (63, 6)).spec,
        P(None, 'tensor'))
    self.assertEqual(
        sharding.named_sharding(mesh, ('vocab', 'embed'), (VOCAB, 5)).spec,
        P(None, None))


if __name__ == '__main__':
  absltest.main()
