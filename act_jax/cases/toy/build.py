"""The toy case: a base trained on a mixture, specialists continued gently.

`build(case_cfg, out_dir)` (the pipeline's build_models stage, selected by
`config.case.name = 'toy'`) writes under `out_dir`:
  <model>/          real HF checkpoints (config.json, model.safetensors,
                    tokenizer) via `hf.save_hf`: `base` and one per
                    specialist in `toy_cfg.specialists`
  data/<ability>/   probe.jsonl, eval.jsonl, sft.jsonl (disjoint seeds)
  build.json        every model's score on every ability (`eval.metrics`,
                    the same metrics the evaluate stage reports)
Each model directory is a finished sub-artifact: a rerun after a kill
retrains only the models that are missing (same seed, same result).
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import logging
import jax

from act_jax import data
from act_jax import distributed
from act_jax.cases.toy import abilities
from act_jax.cases.toy import batches
from act_jax.cases.toy import tokenizer
from act_jax.eval import suite as eval_suite
from act_jax.io import atomic
from act_jax.io import hf
from act_jax.io import models as models_io
from act_jax.model import forward
from act_jax.model import sharding
from act_jax.model.config import ModelConfig
from act_jax.pipeline import jobs
from act_jax.train import finetune


@dataclasses.dataclass(frozen=True)
class ToyConfig:
  """`config.case` of the toy case (name='toy')."""
  name: str = 'toy'  # the case
  seed: int = 0  # init, data and training order seed
  num_layers: int = 4  # L
  hidden_size: int = 128  # D
  intermediate_size: int = 384  # F
  num_heads: int = 4  # H (head_dim = D / H)
  num_kv_heads: int = 2  # K (GQA)
  seq_len: int = 64  # T of packed training rows (tokens)
  batch_size: int = 32  # rows per training step
  base_steps: int = 800  # steps of base pretraining on the mixture
  base_lr: float = 3e-3  # peak lr of base pretraining (AdamW, cosine)
  mixture: str = 'arithmetic:0.45,lang_b:0.25,lang_a:0.1,reverse:0.2'  # a:w
  specialists: str = 'spec_lang_a:lang_a,spec_reverse:reverse'  # name:ability
  spec_steps: int = 200  # continued-training steps per specialist
  spec_lr: float = 3e-4  # gentle continuation (docs/method.md: lr 3e-4)
  num_probe: int = 256  # probe records per ability
  num_eval: int = 256  # eval records per ability
  num_sft: int = 1024  # SFT records per ability


def config(case_cfg: dict) -> ToyConfig:
  """The case config, strictly: an unknown key or a wrong type is an error
  naming it (and the valid keys)."""
  return jobs.section(ToyConfig, case_cfg, 'case')


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


def data_paths(out_dir: str) -> dict[str, dict[str, str]]:
  """`{ability: {split: path}}` of the records `write_data` writes."""
  return {name: {split: os.path.join(out_dir, 'data', name,
                                     f'{split}.jsonl')
                 for split in ('probe', 'eval', 'sft')}
          for name in sorted(abilities.ABILITIES)}


def write_data(toy_cfg, out_dir: str) -> dict[str, dict[str, str]]:
  """Probe / eval / SFT records of every ability; returns their paths."""
  paths = data_paths(out_dir)
  for i, name in enumerate(sorted(abilities.ABILITIES)):
    for split, n in (('probe', toy_cfg.num_probe), ('eval', toy_cfg.num_eval),
                     ('sft', toy_cfg.num_sft)):
      path = paths[name][split]
      seed = toy_cfg.seed * 1000 + _SPLIT_SEED[split] + i
      if not os.path.exists(path):
        atomic.write_text(path, ''.join(
            json.dumps(r) + '\n' for r in abilities.records(name, n, seed)))
  return paths


def eval_data_config(seq_len: int) -> data.DataConfig:
  """How toy records are rendered for scoring: prompt + answer, the answer
  and EOS scored (the demo config's abilities render the same way)."""
  return data.DataConfig(template='qa', qa_format='{prompt}{response}',
                         prompt_field='prompt', response_field='answer',
                         max_seq_len=seq_len, batch_size=256,
                         loss_on='response', add_eos=True)


def eval_sets(tok, eval_paths: dict[str, str], seq_len: int) -> dict:
  """Each ability's eval records as `eval.suite` sets: greedy items (exact
  match, up to one token past the longest answer) or answer-token batches
  (perplexity, answer + EOS)."""
  dcfg = eval_data_config(seq_len)
  out = {}
  for name, path in eval_paths.items():
    a = abilities.get(name)
    task = eval_suite.Task(a.metric, dcfg,
                           max_new_tokens=a.max_answer_chars + 1)
    out[name] = eval_suite.prepare(task, data.load_records(path), tok,
                                   source=path)
  return out


def score_all(params, cfg: ModelConfig, tok, sets: dict, mesh=None
              ) -> dict[str, dict[str, float]]:
  """`{ability: {metric: value}}` for one model."""
  scores = eval_suite.score(params, cfg, sets, tok, gen_batch_size=256,
                            mesh=mesh, label='toy')
  return {name: {m: r[m] for m in eval_suite.METRICS if m in r}
          for name, r in scores.items()}


def local_mesh() -> jax.sharding.Mesh:
  """This process's first device alone.

  The toy model is far too small to gain from splitting its batch, and
  under many (fake CPU) devices splitting only adds overhead. Under
  jax.distributed every process trains the same models on its own device
  (same seeds, same program, same result) and process 0 writes them.
  """
  return sharding.make_mesh((1, 1, 1), devices=jax.local_devices()[:1])


def train_config(toy_cfg, steps: int, lr: float,
                 seed: int) -> finetune.TrainConfig:
  """The toy recipe as a full-scope `finetune.TrainConfig`.

  AdamW (b2 0.98, weight decay 0.01), 5% linear warmup, cosine decay to 10%
  of the peak lr, clip 1.0; no checkpoints (a model directory is the
  resumable unit).
  """
  return finetune.TrainConfig(
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
  mesh = local_mesh()
  logging.info('toy: training %s for %d steps (lr %g)', name, steps, lr)
  return finetune.finetune(train_config(toy_cfg, steps, lr, seed), params, cfg,
                           it, mesh=mesh)


def _save(params, cfg, out, tok_dir):
  # Host copies: every process holds the same model (see `local_mesh`).
  hf.save_hf(jax.device_get(params), cfg, out, tokenizer_dir=tok_dir,
             model_card='A toy act-jax model (see act_jax/cases/toy).\n')


def _primary(tag: str, write, *args) -> None:
  """Process 0 writes; every process waits until it has."""
  if distributed.is_primary():
    write(*args)
  distributed.barrier(tag)


def _make_tokenizer(tok_dir: str) -> None:
  if not os.path.exists(tok_dir):
    with atomic.atomic_dir(tok_dir, collective=False) as tmp:
      tokenizer.make_tokenizer(tmp)


def build(case_cfg: dict, out_dir: str) -> dict:
  """Trains and saves the toy base and specialists (see module docstring).

  Returns the stage summary: `{'scores': {model: {ability: {metric}}}}`.
  """
  toy_cfg = config(case_cfg)
  cfg = model_config(toy_cfg)
  tok_dir = os.path.join(out_dir, 'tokenizer')
  _primary('toy:tokenizer', _make_tokenizer, tok_dir)
  _primary('toy:data', write_data, toy_cfg, out_dir)
  paths = data_paths(out_dir)
  tok = models_io.load_tokenizer(tok_dir)
  sets = eval_sets(tok, {a: p['eval'] for a, p in paths.items()},
                   toy_cfg.seq_len)
  mixture = parse_weights(toy_cfg.mixture)
  specialists = parse_specialists(toy_cfg.specialists)
  report_path = os.path.join(out_dir, 'build.json')
  report = (atomic.read_json(report_path) if os.path.exists(report_path)
            else {'models': {}})

  def record(name, params):
    report['models'][name] = {'scores': score_all(params, cfg, tok, sets,
                                                  local_mesh())}
    logging.info('toy %s: %s', name, report['models'][name]['scores'])
    _primary(f'toy:report:{name}', atomic.write_json, report_path, report)

  base_dir = os.path.join(out_dir, 'base')
  distributed.barrier('toy:base')  # every process decides alike below
  if not os.path.exists(base_dir):
    params = forward.init_params(cfg, jax.random.key(toy_cfg.seed))
    params = _train(params, cfg, toy_cfg, mixture, toy_cfg.base_steps,
                    toy_cfg.base_lr, toy_cfg.seed, 'base')
    record('base', params)
    _save(params, cfg, base_dir, tok_dir)
  _, base = hf.load_hf_params(base_dir)
  for k, (name, ability) in enumerate(sorted(specialists.items())):
    out = os.path.join(out_dir, name)
    distributed.barrier(f'toy:{name}')
    if os.path.exists(out):
      continue
    params = _train(base, cfg, toy_cfg, {ability: 1.0}, toy_cfg.spec_steps,
                    toy_cfg.spec_lr, toy_cfg.seed + 1 + k, name)
    record(name, params)
    _save(params, cfg, out, tok_dir)
  report['data'] = paths
  report['model_config'] = cfg.to_dict()
  _primary('toy:report', atomic.write_json, report_path, report)
  return {'scores': {k: v['scores'] for k, v in report['models'].items()}}
