"""The config schema: defaults of every act-jax experiment config.

Each experiment config (`demo.py`, `recover.py`, `merge.py`, ...) starts from
`base_config()` and overrides fields. Every field carries a trailing comment
with its meaning and unit. Sections are passed to the stage that owns them
only (`cfg.collect` to collect, `cfg.train` to the fine-tune, ...).
"""

import ml_collections

from act_jax import train


def base_config() -> ml_collections.ConfigDict:
  """The full schema with generic defaults (ACT_METHOD.md)."""
  c = ml_collections.ConfigDict()
  c.mode = 'recover'  # comma list of recover | merge | analyze
  c.stages = ''  # comma list of stages to run ('' = all of the mode)
  c.seed = 0  # global seed (toy training, random masks, DARE, SFT mix)
  c.mesh_shape = ''  # e.g. '1,8,1' for (data, fsdp, tensor); '' = all data
  c.models = ml_collections.ConfigDict()  # name -> HF or params dir
  c.abilities = ml_collections.ConfigDict()  # name -> probe/eval/sft JSONL
  c.recover = ml_collections.ConfigDict(dict(
      source='',  # model that has the ability
      target='',  # model that lost it (receives the channels)
      ability='',  # ability (key of `abilities`) to recover
  ))
  c.merge = ml_collections.ConfigDict(dict(
      base='',  # model to merge into
      specialists='',  # 'model:ability,model:ability'
      ))
  c.convert = ml_collections.ConfigDict(dict(
      param_dtype='',  # '' keeps the checkpoint dtype; float32 | bfloat16
  ))
  c.collect = ml_collections.ConfigDict(dict(
      num_probe=0,  # probe records per ability (0 = all)
      max_seq_len=128,  # T, tokens per probe row
      batch_size=8,  # probe rows per batch (global)
      sites='',  # comma list of capture sites ('' = the 7 output sites)
      dtype='float32',  # compute dtype of the forward (stats are float32)
  ))
  c.localize = ml_collections.ConfigDict(dict(
      score='mean_abs_diff',  # scores.SCORES
      select='per_site',  # per_site | global | threshold | mass
      top_frac=0.05,  # rho: fraction of channels per (layer, site)
      unit='channel',  # channel | neuron | head (coupled units)
      seed=0,  # random-channel baseline seed
  ))
  c.transfer = ml_collections.ConfigDict(dict(
      alpha=1.0,  # theta' = tgt + alpha * M * (src - tgt); 1 = copy
      policy='average',  # merge conflicts: average | max_score | priority
      baselines='linear,task_arithmetic,ties,dare',  # merging baselines
      interp_t=0.5,  # linear interpolation weight of the source
      ta_lambda=0.5,  # task arithmetic scale (recover: S + lam (T - S))
      ties_density=0.2,  # TIES: kept fraction of each task vector tensor
      dare_drop=0.9,  # DARE: drop probability of task vector entries
      seed=0,  # DARE seed
  ))
  c.train = train.default_train_config()  # compatibility fine-tune
  c.train.lr = 1e-5
  c.train.num_steps = 200
  c.sft = ml_collections.ConfigDict(dict(
      ability_weight=0.5,  # share of SFT records from transferred abilities
      retain_weight=0.5,  # share from the other abilities (split evenly)
      num_records=2048,  # SFT records in the mixture
      seed=0,  # mixture shuffle seed
  ))
  c.evaluate = ml_collections.ConfigDict(dict(
      engine='toy',  # toy (toy abilities) | act (act_jax.evaluate)
      num_eval=256,  # eval records per ability (0 = all)
      batch_size=16,  # eval rows per forward (engine act)
      max_seq_len=128,  # T for perplexity rows
      rho_sweep='',  # sufficiency curve: comma list of rho ('' = off)
  ))
  c.report = ml_collections.ConfigDict(dict(
      title='ACT run',  # report heading
  ))
  return c
