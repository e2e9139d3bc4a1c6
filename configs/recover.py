"""ACT recover on real HF checkpoints: an ability from source into target.

Models and data come from flags; abilities are JSONL files of records with
`prompt` and `answer`:
  python -m act_jax.main --config=configs/recover.py --workdir=/runs/rec \\
    --config.models.source=/ckpt/base --config.models.target=/ckpt/spec \\
    --config.abilities.ability.probe=math_probe.jsonl \\
    --config.abilities.ability.eval=math_eval.jsonl \\
    --config.abilities.ability.sft=math_sft.jsonl \\
    --config.abilities.retain.eval=lang_eval.jsonl \\
    --config.abilities.retain.sft=lang_sft.jsonl
Only localization: `--config.mode=analyze`. A subset of stages:
`--config.stages=collect,localize` (inputs must be complete).

Settings for 7B models (Qwen2.5-7B: 28 layers, D 3584, F 18944; Llama-3-8B:
32 layers, D 4096, F 14336), bf16 params, f32 statistics; each fits its
budget in `benchmarks/plan_7b.py` (table and caveats in BUILD.md, "Scale"):
  TPU v4-32 / v5e-32 (32 chips, 16 GB each): --config.mesh_shape=1,32,1
    --config.convert.param_dtype=bfloat16 --config.collect.dtype=bfloat16
    --config.collect.batch_size=64 --config.collect.max_seq_len=1024
    --config.train.batch_size=64 --config.train.max_seq_len=1024
    --config.train.compute_dtype=bfloat16 --config.train.lean=True
    --config.train.remat=full --config.evaluate.batch_size=64
    (plan: statistics 5.4 GB, fine-tune 13.6 GB, evaluate 4.6 GB a chip)
  8 x H100/H200 (one node, 80 GB each): --config.mesh_shape=1,8,1, same
    dtypes, --config.collect.batch_size=32 --config.train.batch_size=32
    --config.train.remat=dots --config.evaluate.batch_size=32
    (plan: statistics 14 GB, fine-tune 42 GB, evaluate 9 GB a device).
Two 7B models stacked for collection need ~28 GB in bf16, split over the
fsdp axis; the fine-tune with `lean=True` keeps Adam moments only for the
selected slices.
Launch: launch/tpu_pod.sh or launch/slurm_gpu.sh (BUILD.md).
"""

import ml_collections

from act_jax.pipeline import jobs


def get_config() -> ml_collections.ConfigDict:
  """Recover config; fill models and ability files by flags."""
  c = jobs.default_config()
  c.mode = 'recover'
  c.models.source = ''  # HF dir of the model that has the ability
  c.models.target = ''  # HF dir of the model that lost it
  c.abilities.ability = jobs.ability(  # the ability to recover
      metric='exact_match',  # greedy generation, answer matching
      match='last_number',  # the reply's last number is the answer
      max_new_tokens=64,  # generation budget
      template='qa',  # prompt + answer joined by qa_format
      qa_format='Question: {prompt}\nAnswer: {response}')
  c.abilities.retain = jobs.ability(  # the target's specialty, to keep
      metric='perplexity', template='text')
  c.recover.source = 'source'
  c.recover.target = 'target'
  c.recover.ability = 'ability'
  c.localize.top_frac = 0.05
  return c
