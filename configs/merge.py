"""ACT merge on real HF checkpoints: K specialists into a base.

  python -m act_jax.main --config=configs/merge.py --workdir=/runs/merge \\
    --config.models.base=/ckpt/base --config.models.spec1=/ckpt/math \\
    --config.models.spec2=/ckpt/lang \\
    --config.abilities.skill1.probe=... (eval, sft; skill2 likewise)
Specialists are `model:ability` pairs in `--config.merge.specialists`
(default `spec1:skill1,spec2:skill2`); channel conflicts are resolved by
`--config.transfer.policy` (average | max_score | priority).
7B settings (Qwen2.5-7B / Llama-2-7B, bf16): as in configs/recover.py; K+1
models stacked for collection need (K+1) x 14 GB in bf16, or use two models
per pass by the collect engine (models_per_pass) on smaller meshes.
"""

import ml_collections

from act_jax.pipeline import jobs


def get_config() -> ml_collections.ConfigDict:
  """Merge config; fill models and ability files by flags."""
  c = jobs.default_config()
  c.mode = 'merge'
  c.models.base = ''  # HF dir of the base
  c.models.spec1 = ''  # HF dir of specialist 1
  c.models.spec2 = ''  # HF dir of specialist 2
  for name in ('skill1', 'skill2'):
    c.abilities[name] = jobs.ability(
        metric='exact_match',  # greedy generation, answer matching
        match='last_number',  # the reply's last number is the answer
        max_new_tokens=64,  # generation budget
        template='qa',  # prompt + answer joined by qa_format
        qa_format='Question: {prompt}\nAnswer: {response}')
  c.merge.base = 'base'
  c.merge.specialists = 'spec1:skill1,spec2:skill2'
  return c
