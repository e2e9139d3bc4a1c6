"""A small full-parameter AdamW loop for building the toy models.

Only the toy recipe uses this (pretraining a base from scratch and the
specialists' continued training); the ACT compatibility fine-tune uses
`act_jax.train.finetune` with channel masks.
"""

from __future__ import annotations

import functools
import time

from absl import logging
import jax
import jax.numpy as jnp
import optax

from act_jax import forward
from act_jax.model_config import ModelConfig


def lm_loss(params, batch, cfg: ModelConfig) -> jax.Array:
  """Mean next-token cross entropy over `loss_mask_bt` positions."""
  out = forward.apply(params, batch['tokens_bt'], cfg,
                      attention_mask_bt=batch['attention_mask_bt'])
  logits = out.logits[:, :-1].astype(jnp.float32)
  targets = batch['tokens_bt'][:, 1:]
  mask = batch['loss_mask_bt'][:, 1:]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_optimizer(lr: float, num_steps: int, warmup_frac: float = 0.05,
                   weight_decay: float = 0.01, clip: float = 1.0):
  """AdamW with linear warmup and cosine decay to 10% of `lr`."""
  warmup = max(1, int(num_steps * warmup_frac))
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup,
                                             max(num_steps, warmup + 1),
                                             lr * 0.1)
  return optax.chain(optax.clip_by_global_norm(clip),
                     optax.adamw(sched, b2=0.98, weight_decay=weight_decay))


def train(params, cfg: ModelConfig, batches, *, lr: float, num_steps: int,
          log_every: int = 100, name: str = 'toy'):
  """Trains all params on `batches` (an iterator of numpy dicts).

  Returns:
    (params, losses) with one float per step.
  """
  opt = make_optimizer(lr, num_steps)
  state = opt.init(params)

  @functools.partial(jax.jit, donate_argnums=(1,))
  def step(params, state, batch):
    loss, grads = jax.value_and_grad(lm_loss)(params, batch, cfg)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  t0 = time.time()
  for i, batch in enumerate(batches):
    params, state, loss = step(params, state, batch)
    if (i + 1) % log_every == 0 or i + 1 == num_steps:
      loss = float(loss)
      rate = (i + 1) / (time.time() - t0)
      logging.info('[%s] step %d/%d loss %.4f (%.1f steps/s, ETA %.0fs)', name,
                   i + 1, num_steps, loss, rate, (num_steps - i - 1) / rate)
    losses.append(loss)
  return params, [float(x) for x in losses]
