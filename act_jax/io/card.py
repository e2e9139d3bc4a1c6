"""Model card (README.md) for an ACT result, and its HF export.

`build_model_card` writes the provenance body: source and target
checkpoints, channel counts per site (and per layer), probe data, fine-tune
data and hyperparameters, and the before/after metrics table
(`format_table`, values with their intervals when known). `hub_card` puts
it under YAML front matter as a `huggingface_hub.ModelCard` (`base_model`,
`tags`, `library_name`), so the Hub and `ModelCard.load` read it.
`export_hf` writes params with `hf.save_hf` (sharded safetensors +
config.json + tokenizer and generation files, atomically) and that card.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

import huggingface_hub
import jax
import numpy as np

from act_jax.io import hf
from act_jax.model import config as config_lib
from act_jax.model.config import ModelConfig


def _as_dict(x) -> dict[str, Any]:
  if x is None:
    return {}
  if dataclasses.is_dataclass(x):
    return dataclasses.asdict(x)
  if hasattr(x, 'to_dict'):
    return x.to_dict()
  return dict(x)


def channel_table(mask: Mapping[str, Any]) -> str:
  """Markdown: per site, selected channels per layer, total and fraction.

  `mask` is a compact channel mask `{site: [L, C] bool}` (masks.py).
  """
  lines = ['| site | per layer | total | of | fraction |',
           '|---|---|---|---|---|']
  grand = grand_of = 0
  for site in sorted(mask):
    m = np.asarray(mask[site], bool)
    per = m.reshape(m.shape[0], -1).sum(-1).tolist()
    total, of = int(m.sum()), int(m.size)
    grand, grand_of = grand + total, grand_of + of
    lines.append(f'| {site} | {per} | {total} | {of} | {total / of:.4f} |')
  if grand_of:
    lines.append(f'| **all** | | {grand} | {grand_of} | '
                 f'{grand / grand_of:.4f} |')
  return '\n'.join(lines)


def build_model_card(*, name: str, cfg: ModelConfig,
                     sources: Mapping[str, str], target: str,
                     mask: Mapping[str, Any] | None = None,
                     probe_data: Mapping[str, Any] | None = None,
                     finetune_data: Mapping[str, Any] | None = None,
                     train_cfg: Any = None,
                     results: Mapping[str, Any] | None = None,
                     notes: str = '') -> str:
  """The README.md text.

  Args:
    name: model name (card title).
    cfg: the model config.
    sources: `{ability: source checkpoint path or name}`.
    target: the checkpoint that received the channels.
    mask: compact channel mask `{site: [L, C]}` that was transferred.
    probe_data: `{ability: description / path / size}` used to localize.
    finetune_data: description of the fine-tune mixture (paths, weights,
      sizes; e.g. data.load_batches' info).
    train_cfg: the train sub-config (dataclass or ConfigDict).
    results: `{model: {ability: {metric: value}}}`; a value may be
      `(value, lo, hi)` (shown with its interval).
    notes: free text appended at the end.
  """
  out = [f'# {name}', '',
         'Produced with act-jax (Activation-Guided Channel-wise Ability '
         'Transfer): channels localized by activation difference were '
         'transplanted from the source(s) into the target, then fine-tuned '
         'briefly with only those channels trainable.', '',
         '## Models', '', f'- target: `{target}`']
  out += [f'- source for `{a}`: `{s}`' for a, s in sources.items()]
  out += ['', f'Architecture: `{cfg.model_type}`, {cfg.num_layers} layers, '
          f'hidden {cfg.hidden_size}, vocab {cfg.vocab_size}.', '']
  if mask is not None:
    out += ['## Transferred channels', '', channel_table(mask), '']
  if probe_data:
    out += ['## Probe data (localization)', '', '```json',
            json.dumps(_as_dict(probe_data), indent=2, sort_keys=True,
                       default=str), '```', '']
  if finetune_data:
    out += ['## Fine-tune data', '', '```json',
            json.dumps(_as_dict(finetune_data), indent=2, sort_keys=True,
                       default=str), '```', '']
  if train_cfg is not None:
    out += ['## Fine-tune hyperparameters', '', '| field | value |',
            '|---|---|']
    out += [f'| {k} | {v} |' for k, v in sorted(_as_dict(train_cfg).items())]
    out += ['']
  if results:
    out += ['## Evaluation (before / after)', '',
            format_table(results), '']
  if notes:
    out += ['## Notes', '', notes, '']
  out += ['Load with `transformers.AutoModelForCausalLM.from_pretrained`.', '']
  return '\n'.join(out)


def short_card(cfg: ModelConfig, params, notes: str = '') -> str:
  """The README.md of a plain export (`convert`, the transfer CLI): the
  architecture, the param count and dtype, and `notes` (provenance)."""
  leaves = jax.tree.leaves(params)
  dtypes = sorted({np.dtype(x.dtype).name for x in leaves})
  n = sum(int(np.prod(x.shape)) for x in leaves)
  out = [f'# {cfg.model_type} model exported by act-jax', '',
         f'- architecture: {config_lib.ARCHITECTURES[cfg.model_type]}',
         f'- parameters: {n:,} ({", ".join(dtypes)})',
         f'- layers {cfg.num_layers}, hidden {cfg.hidden_size}, heads '
         f'{cfg.num_heads} (kv {cfg.num_kv_heads}), vocab {cfg.vocab_size}']
  if notes:
    out += ['', notes]
  out += ['', 'Load with `transformers.AutoModelForCausalLM.from_pretrained`.',
          '']
  return '\n'.join(out)


def hub_card(body: str, *, base_models: Sequence[str],
             tags: Sequence[str] = ('act-jax', 'merge'),
             license_: str | None = None) -> huggingface_hub.ModelCard:
  """`body` under YAML front matter, as the Hub reads a README.md.

  Args:
    body: the Markdown card (`build_model_card`).
    base_models: the checkpoints the result was made from (Hub ids or
      paths; `base_model` in the metadata).
    tags: Hub tags.
    license_: the license id, when the base models' is known.
  """
  data = huggingface_hub.ModelCardData(
      base_model=list(base_models), tags=list(tags),
      library_name='transformers', pipeline_tag='text-generation',
      license=license_)
  return huggingface_hub.ModelCard(f'---\n{data.to_yaml()}\n---\n\n{body}')


def export_hf(params, cfg: ModelConfig, out_dir: str, *, card: str,
              tokenizer_dir: str | None = None,
              hf_config: dict[str, Any] | None = None,
              dtype: str | None = None, max_shard_bytes: int = 2**30,
              overwrite: bool = False) -> str:
  """Writes the params as an HF checkpoint with `card` as README.md.

  `dtype` (e.g. the source's 'bfloat16') casts every leaf first; the fp32
  master weights are written as they are otherwise. Returns `out_dir`.
  """
  if dtype is not None:
    # Cast where the leaves live (a multi-host array is never fetched whole
    # here; save_hf gathers it leaf by leaf).
    params = jax.tree.map(lambda x: x.astype(dtype), params)
  hf.save_hf(params, cfg, out_dir, hf_config=hf_config,
             tokenizer_dir=tokenizer_dir, model_card=card,
             max_shard_bytes=max_shard_bytes, overwrite=overwrite)
  return out_dir


def format_table(results: Mapping[str, Mapping[str, Mapping[str, float]]],
                 digits: int = 3) -> str:
  """Markdown: one row per model, one column per (ability, metric); a
  `(value, lo, hi)` value is shown as `value [lo, hi]`."""
  cols = []
  for per_model in results.values():
    for ability, metrics in per_model.items():
      for m in metrics:
        if (ability, m) not in cols:
          cols.append((ability, m))
  lines = ['| model | ' + ' | '.join(f'{a} {m}' for a, m in cols) + ' |',
           '|---|' + '---|' * len(cols)]
  for name, per_model in results.items():
    vals = []
    for a, m in cols:
      v = per_model.get(a, {}).get(m)
      if v is None:
        vals.append('-')
      elif isinstance(v, (list, tuple)):
        vals.append(f'{v[0]:.{digits}f} [{v[1]:.{digits}f}, '
                    f'{v[2]:.{digits}f}]')
      else:
        vals.append(f'{v:.{digits}f}')
    lines.append(f'| {name} | ' + ' | '.join(vals) + ' |')
  return '\n'.join(lines)
