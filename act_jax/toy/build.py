"""The toy recipe: a base trained on a mixture, specialists continued gently.

`build_models(toy_cfg, out_dir)` writes under `out_dir`:
  <model>/          real HF checkpoints (config.json, model.safetensors,
                    tokenizer) via `hf_export.save_hf`: `base` and one per
                    specialist in `toy_cfg.specialists`
  data/<ability>/   probe.jsonl, eval.jsonl, sft.jsonl (disjoint seeds)
  build.json        every model's score on every ability
Each model directory is a finished sub-artifact: a rerun after a kill
retrains only the models that are missing (same seed, same result).
"""

from __future__ import annotations

import json
import os

from absl import logging
import jax
from act_jax import forward, hf_export, sharding, train
from act_jax.model_config import ModelConfig
from act_jax.toy import abilities, batches, metrics, tokenizer

# Disjoint seed offsets per split, so probe/eval/sft/train never coincide.
_SPLIT_SEED = {'probe': 101, 'eval': 202, 'sft': 303, 'train': 404}


def parse_weights(spec: str) -> dict[str, float]:
  """'a:0.5,b:0.5' -> {'a': 0.5, 'b': 0.5}; errors name the bad entry."""
  out = {}
  for part in filter(None, (p.strip() for p in spec.split(','))):
    name, _, w = part.partition(':')
    abilities.get(name)
    try:
      out[name] = float(w) if w else 1.0
    except ValueError as e:
      raise ValueError(f'bad weight in {spec!r}: {part!r}') from e
  if not out:
    raise ValueError(f'empty ability list {spec!r}')
  return out


def parse_specialists(spec: str) -> dict[str, str]:
  """'spec_a:lang_a,spec_b:reverse' -> {model name: ability}."""
  out = {}
  for part in filter(None, (p.strip() for p in spec.split(','))):
    name, sep, ability = part.partition(':')
    if not sep or not name:
      raise ValueError(f'specialist {part!r}: expected name:ability')
    abilities.get(ability)
    out[name] = ability
  return out


def model_config(toy_cfg) -> ModelConfig:
  """The toy Llama architecture from `toy_cfg`."""
  return ModelConfig(
      model_type='llama', vocab_size=tokenizer.vocab_size(),
      hidden_size=toy_cfg.hidden_size,
      intermediate_size=toy_cfg.intermediate_size,
      num_layers=toy_cfg.num_layers, num_heads=toy_cfg.num_heads,
      num_kv_heads=toy_cfg.num_kv_heads,
      head_dim=toy_cfg.hidden_size // toy_cfg.num_heads,
      max_position_embeddings=toy_cfg.seq_len, rms_norm_eps=1e-6)


def write_jsonl(path: str, records: list[dict]):
  """Writes records atomically (temp file + rename)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')
  os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
  """Reads a JSONL file of records."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def write_data(toy_cfg, out_dir: str) -> dict[str, dict[str, str]]:
  """Probe / eval / SFT records of every ability; returns their paths."""
  paths = {}
  for i, name in enumerate(sorted(abilities.ABILITIES)):
    paths[name] = {}
    for split, n in (('probe', toy_cfg.num_probe), ('eval', toy_cfg.num_eval),
                     ('sft', toy_cfg.num_sft)):
      path = os.path.join(out_dir, 'data', name, f'{split}.jsonl')
      seed = toy_cfg.seed * 1000 + _SPLIT_SEED[split] + i
      if not os.path.exists(path):
        write_jsonl(path, abilities.records(name, n, seed))
      paths[name][split] = path
  return paths


def score_all(params, cfg: ModelConfig, eval_sets: dict[str, list[dict]],
              seq_len: int) -> dict[str, dict[str, float]]:
  """`{ability: {metric: value}}` for one model."""
  return {a: metrics.score(params, cfg, a, recs, seq_len)
          for a, recs in eval_sets.items()}


def train_config(toy_cfg, steps: int, lr: float,
                 seed: int) -> train.TrainConfig:
  """The toy recipe as a full-scope `train.TrainConfig`.

  AdamW (b2 0.98, weight decay 0.01), 5% linear warmup, cosine decay to 10%
  of the peak lr, clip 1.0; no checkpoints (a model directory is the
  resumable unit).
  """
  return train.TrainConfig(
      num_steps=steps, lr=lr, warmup_frac=0.05, schedule='cosine',
      final_lr_frac=0.1, weight_decay=0.01, clip_norm=1.0,
      batch_size=toy_cfg.batch_size, max_seq_len=toy_cfg.seq_len,
      scope='full', save_every=0, seed=seed, log_every=max(1, steps // 5),
      b2=0.98)


def _train(params, cfg, toy_cfg, weights, steps, lr, seed, name):
  n = steps * toy_cfg.batch_size * max(1, toy_cfg.seq_len // 12)
  recs = abilities.mixture(weights, n, seed)
  arrays = batches.pack_records(recs, toy_cfg.seq_len,
                                num_rows=steps * toy_cfg.batch_size)
  it = batches.iterate(arrays, toy_cfg.batch_size, seed, steps)
  # One device: the toy model is far too small to gain from splitting its
  # batch, and under many (fake CPU) devices splitting only adds overhead.
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  logging.info('toy: training %s for %d steps (lr %g)', name, steps, lr)
  return train.finetune(train_config(toy_cfg, steps, lr, seed), params, cfg,
                        it, mesh=mesh)


def _save(params, cfg, out, tok_dir):
  hf_export.save_hf(jax.device_get(params), cfg, out, tokenizer_dir=tok_dir,
                    model_card='A toy act-jax model (see act_jax/toy).\n')


def build_models(toy_cfg, out_dir: str) -> dict:
  """Trains and saves the toy base and specialists (see module docstring)."""
  cfg = model_config(toy_cfg)
  tok_dir = os.path.join(out_dir, 'tokenizer')
  if not os.path.exists(tok_dir):
    tokenizer.make_tokenizer(tok_dir + '.tmp')
    os.replace(tok_dir + '.tmp', tok_dir)
  data = write_data(toy_cfg, out_dir)
  eval_sets = {a: read_jsonl(p['eval']) for a, p in data.items()}
  mixture = parse_weights(toy_cfg.mixture)
  specialists = parse_specialists(toy_cfg.specialists)
  report_path = os.path.join(out_dir, 'build.json')
  report = (json.load(open(report_path)) if os.path.exists(report_path)
            else {'models': {}})

  def record(name, params):
    report['models'][name] = {
        'scores': score_all(params, cfg, eval_sets, toy_cfg.seq_len)}
    logging.info('toy %s: %s', name, report['models'][name]['scores'])
    tmp = report_path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(report, f, indent=2, sort_keys=True)
    os.replace(tmp, report_path)

  base_dir = os.path.join(out_dir, 'base')
  if not os.path.exists(base_dir):
    params = forward.init_params(cfg, jax.random.key(toy_cfg.seed))
    params = _train(params, cfg, toy_cfg, mixture, toy_cfg.base_steps,
                    toy_cfg.base_lr, toy_cfg.seed, 'base')
    record('base', params)
    _save(params, cfg, base_dir, tok_dir)
  from act_jax import hf_convert  # pylint: disable=g-import-not-at-top
  _, base = hf_convert.load_hf_params(base_dir)
  for k, (name, ability) in enumerate(sorted(specialists.items())):
    out = os.path.join(out_dir, name)
    if os.path.exists(out):
      continue
    params = _train(base, cfg, toy_cfg, {ability: 1.0}, toy_cfg.spec_steps,
                    toy_cfg.spec_lr, toy_cfg.seed + 1 + k, name)
    record(name, params)
    _save(params, cfg, out, tok_dir)
  report['data'] = data
  report['model_config'] = cfg.to_dict()
  return report
