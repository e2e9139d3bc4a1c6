"""Model directories of either kind, and the checks that make models related.

A model directory is a converted params dir (`model_config.json`, see
`params`) or an HF checkpoint dir (`config.json` + safetensors, see `hf`).
  load_config(path)       its ModelConfig without reading weights (an HF dir
                          also has its index and safetensors headers checked)
  load_model(path)        (cfg, params), onto a mesh when given
  load_tokenizer(path)    local files only, never remote code
  check_related(paths)    every model exists, is readable, and shares the
                          architecture and tokenizer of the first; fails by
                          name before any weights are read
  check_same_shapes(...)  the first differing param leaf, by name
  load_related(paths)     check_related, then load every model
  resolve_model(spec)     a local directory as is, or a Hub id (`org/name`,
                          `org/name@revision`) fetched with
                          `huggingface_hub.snapshot_download`: only
                          safetensors, JSON and tokenizer files
  model_fingerprint(path) what the model's content is: every file act-jax
                          reads from it (config, index, safetensors headers
                          + tensor bytes, params files, tokenizer files),
                          digested and cached beside the weights by size
                          and mtime (`inputs.dir_fingerprint`)
Files that are symlinks resolving outside their checkpoint are refused
unless `follow_symlinks` (every function here takes it).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Sequence

import huggingface_hub
from huggingface_hub import constants as hub_constants
import jax
import jax.numpy as jnp

from act_jax.io import hf
from act_jax.io import inputs
from act_jax.io import params as params_io
from act_jax.model.config import ModelConfig

# Fields that do not change the param tree or the math of a checkpoint.
ARCH_IGNORED = ('dtype', 'param_dtype', 'max_position_embeddings')
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer.model', 'vocab.json')


# What a Hub model needs here: weights as safetensors (+ index), config and
# generation config, tokenizer files (and chat templates); never .bin/.pt.
HUB_PATTERNS = ('*.safetensors', '*.json', 'tokenizer.model', '*.txt',
                '*.jinja')
_HUB_ID = re.compile(r'^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?$')


class ModelDirError(ValueError):
  """A model directory that is missing, unreadable or not related."""


def is_hub_id(spec: str) -> bool:
  """Whether `spec` reads as a Hub model id (`org/name[@revision]`) rather
  than a path (absolute, relative with ./ or ~, or an existing one)."""
  return (not os.path.exists(spec) and not spec.startswith(('.', '~')) and
          bool(_HUB_ID.match(spec)))


def resolve_model(spec: str) -> str:
  """The local model directory of `spec`.

  A path is returned as it is (its checks come later, by name); a Hub id
  `org/name` or `org/name@revision` is fetched with
  `huggingface_hub.snapshot_download` limited to `HUB_PATTERNS` (so only
  safetensors, JSON and tokenizer files), into huggingface_hub's cache; a
  cached snapshot is reused, offline too (`HF_HUB_OFFLINE=1`).

  Raises:
    ModelDirError, one line saying what to download and where, when the id
    is not cached and cannot be fetched (offline, unknown, gated).
  """
  if not is_hub_id(spec):
    return spec
  repo, _, revision = spec.partition('@')
  try:
    return huggingface_hub.snapshot_download(
        repo, revision=revision or None, allow_patterns=list(HUB_PATTERNS))
  except Exception as e:  # offline, unknown, gated, network: one message
    why = ' '.join(str(e).split())[:200] or type(e).__name__
    include = ' '.join(f"'{p}'" for p in HUB_PATTERNS)
    raise ModelDirError(
        f'{spec}: not a local directory, and the Hub model could not be '
        f'fetched ({type(e).__name__}: {why}); download it where there is '
        f'network with `hf download {repo}'
        + (f' --revision {revision}' if revision else '') +
        f' --include {include} --local-dir DIR` and pass DIR instead (or '
        f'fill the cache {hub_constants.HF_HUB_CACHE})'
    ) from None


def load_config(path: str, follow_symlinks: bool = False) -> ModelConfig:
  """The ModelConfig of a model directory, without reading tensor data.

  Raises:
    ModelDirError naming `path` and what is wrong with it.
  """
  if not os.path.isdir(path):
    raise ModelDirError(f'missing checkpoint directory {path}')
  try:
    if os.path.isfile(os.path.join(path, params_io.MODEL_CONFIG)):
      return params_io.load_model_config(path)
    if not os.path.isfile(os.path.join(path, 'config.json')):
      raise ModelDirError(f'{path}: neither a params dir '
                          f'({params_io.MODEL_CONFIG}) nor an HF checkpoint '
                          'dir (config.json)')
    cfg = hf.load_hf_config(path, follow_symlinks=follow_symlinks)
    files, key_file = hf.checkpoint_files(path, follow_symlinks)
    hf.validate_checkpoint(cfg, hf.read_headers(files), key_file, path)
    return cfg
  except ModelDirError:
    raise
  except (ValueError, OSError) as e:
    raise ModelDirError(f'{path}: {e}') from None


def load_model(path: str, **kwargs) -> tuple[ModelConfig, Any]:
  """`(cfg, params)` from a params dir or an HF checkpoint dir.

  Keyword arguments (`mesh`, `rules`, `param_dtype`, `follow_symlinks`) go
  to `params.load_params_dir` or `hf.load_hf_params`.
  """
  if os.path.isfile(os.path.join(path, params_io.MODEL_CONFIG)):
    return params_io.load_params_dir(path, **kwargs)
  if os.path.isfile(os.path.join(path, 'config.json')):
    return hf.load_hf_params(path, **kwargs)
  raise ModelDirError(f'{path}: neither a params dir '
                      f'({params_io.MODEL_CONFIG}) nor an HF checkpoint dir '
                      '(config.json)')


def has_tokenizer(path: str) -> bool:
  """Whether `path` holds tokenizer files."""
  return any(os.path.isfile(os.path.join(path, n)) for n in TOKENIZER_FILES)


def has_chat_template(path: str) -> bool:
  """Whether the tokenizer files in `path` define a chat template."""
  if any(os.path.isfile(os.path.join(path, n)) for n in
         ('chat_template.jinja', 'chat_template.json')):
    return True
  cfg = os.path.join(path, 'tokenizer_config.json')
  if not os.path.isfile(cfg):
    return False
  with open(cfg, encoding='utf-8') as f:
    return bool(json.load(f).get('chat_template'))


def load_tokenizer(path: str):
  """The tokenizer saved in `path` (local files only, no remote code)."""
  import transformers  # pylint: disable=g-import-not-at-top  (start-up cost)
  if not has_tokenizer(path):
    raise ModelDirError(f'{path}: no tokenizer files '
                        f'({", ".join(TOKENIZER_FILES)})')
  return transformers.AutoTokenizer.from_pretrained(
      path, trust_remote_code=False, local_files_only=True)


def tokenizer_fingerprint(path: str) -> str:
  """What two tokenizers must share, read from the files (no transformers):
  the model (vocabulary, merges) and the added tokens of tokenizer.json, or
  the bytes of tokenizer.model / vocab.json."""
  tj = os.path.join(path, 'tokenizer.json')
  if os.path.isfile(tj):
    with open(tj, encoding='utf-8') as f:
      tok = json.load(f)
    return json.dumps({'model': tok.get('model'),
                       'added': tok.get('added_tokens')}, sort_keys=True)
  for name in TOKENIZER_FILES[1:]:
    p = os.path.join(path, name)
    if os.path.isfile(p):
      with open(p, 'rb') as f:
        return f.read().hex()
  raise ModelDirError(f'{path}: no tokenizer files '
                      f'({", ".join(TOKENIZER_FILES)})')


def arch_diff(a: ModelConfig, b: ModelConfig) -> dict[str, tuple[Any, Any]]:
  """`{field: (a's, b's)}` for the architecture fields that differ."""
  da, db = a.to_dict(), b.to_dict()
  return {k: (da[k], db[k]) for k in sorted(da)
          if k not in ARCH_IGNORED and da[k] != db[k]}


def check_related(paths: Mapping[str, str] | Sequence[str],
                  check_tokenizers: bool = True,
                  follow_symlinks: bool = False) -> dict[str, ModelConfig]:
  """Every model is readable and shares architecture and tokenizer.

  Args:
    paths: `{name: dir}` (names appear in errors) or a list of dirs.
    check_tokenizers: also compare tokenizer files (a model without any is
      skipped).
    follow_symlinks: accept files that are symlinks out of their model dir.

  Returns:
    `{name: ModelConfig}`.

  Raises:
    ModelDirError naming both models and the first differing field.
  """
  if not isinstance(paths, Mapping):
    paths = {p: p for p in paths}
  if not paths:
    raise ModelDirError('no models given')
  cfgs = {n: load_config(p, follow_symlinks) for n, p in paths.items()}
  names = list(paths)
  ref = names[0]
  for name in names[1:]:
    diff = arch_diff(cfgs[ref], cfgs[name])
    if diff:
      field, (x, y) = next(iter(diff.items()))
      raise ModelDirError(
          f'models {ref} ({paths[ref]}) and {name} ({paths[name]}) do not '
          f'share an architecture: {field} = {x!r} vs {y!r}')
  if check_tokenizers:
    have = [n for n in names if has_tokenizer(paths[n])]
    for name in have[1:]:
      if tokenizer_fingerprint(paths[name]) != tokenizer_fingerprint(
          paths[have[0]]):
        raise ModelDirError(
            f'models {have[0]} and {name}: the tokenizer of {paths[name]} '
            f'differs from {paths[have[0]]} (they do not share a tokenizer)')
  return cfgs


def check_tokenizer_fits(tokenizer, tokenizer_path: str,
                         cfg: ModelConfig) -> None:
  """Raises ModelDirError when token ids could exceed the vocabulary."""
  if len(tokenizer) > cfg.vocab_size:
    raise ModelDirError(f'tokenizer {tokenizer_path} has {len(tokenizer)} '
                        f'ids, more than the models\' vocab_size='
                        f'{cfg.vocab_size}')


def check_same_shapes(paths: Sequence[str], params: Sequence[Any]) -> None:
  """Raises ModelDirError naming both dirs and the first differing leaf."""
  ref = {jax.tree_util.keystr(p): x.shape
         for p, x in jax.tree_util.tree_leaves_with_path(params[0])}
  for path, tree in zip(paths[1:], params[1:]):
    other = {jax.tree_util.keystr(p): x.shape
             for p, x in jax.tree_util.tree_leaves_with_path(tree)}
    for key in sorted(set(ref) | set(other)):
      if ref.get(key) != other.get(key):
        raise ModelDirError(
            f'models {paths[0]} and {path} differ at param {key}: '
            f'{ref.get(key)} vs {other.get(key)}')


def load_related(paths: Sequence[str], dtype: str | None = None,
                 **kwargs) -> tuple[ModelConfig, list[Any]]:
  """Checks and loads K related models; casts params to `dtype` if given.

  Configs and tokenizers are compared before any weights are read; keyword
  arguments (`mesh`, `rules`, `follow_symlinks`) go to `load_model`.
  """
  check_related(list(paths),
                follow_symlinks=kwargs.get('follow_symlinks', False))
  loaded = [load_model(p, **kwargs) for p in paths]
  params = [p for _, p in loaded]
  check_same_shapes(list(paths), params)
  cfg = loaded[0][0]
  if dtype is not None:
    cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
    params = [jax.tree.map(lambda x: jnp.asarray(x, dtype), p)
              for p in params]
  return cfg, params


def generation_stop_ids(path: str, tokenizer) -> tuple[int, ...]:
  """The ids greedy generation stops at, as transformers' `generate` would:
  `generation_config.json`'s eos_token_id (an id or a list) when the model
  has one, and the tokenizer's EOS."""
  ids = set()
  gc = os.path.join(path, 'generation_config.json')
  if os.path.isfile(gc):
    with open(gc, encoding='utf-8') as f:
      eos = json.load(f).get('eos_token_id')
    ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None
               else [])
  if tokenizer.eos_token_id is not None:
    ids.add(tokenizer.eos_token_id)
  return tuple(sorted(int(i) for i in ids))


def model_files(path: str, follow_symlinks: bool = False) -> list[str]:
  """The files act-jax reads from model dir `path`, relative to it.

  Raises:
    ModelDirError when `path` is no model directory; UnsafeInputError for a
    file that is a symlink out of `path` (unless `follow_symlinks`).
  """
  aux = [n for n in params_io.AUX_FILES
         if os.path.isfile(os.path.join(path, n))]
  if os.path.isfile(os.path.join(path, params_io.MODEL_CONFIG)):
    names = [params_io.MODEL_CONFIG] + inputs.tree_files(path,
                                                         params_io.PARAMS)
    if os.path.isfile(os.path.join(path, params_io.HF_CONFIG)):
      names.append(params_io.HF_CONFIG)
    return names + aux
  if not os.path.isfile(os.path.join(path, 'config.json')):
    raise ModelDirError(f'{path}: neither a params dir '
                        f'({params_io.MODEL_CONFIG}) nor an HF checkpoint dir '
                        '(config.json)')
  files, key_file = hf.checkpoint_files(path, follow_symlinks)
  names = ['config.json'] + [os.path.relpath(f, path) for f in files]
  if key_file is not None:
    names.append(hf.INDEX_FILE)
  return names + aux


def model_fingerprint(path: str, follow_symlinks: bool = False
                      ) -> dict[str, Any]:
  """`{'digest', 'files': {name: digest}}` of a model directory's content.

  Safetensors files are digested as header + tensor bytes, streamed; the
  digests are cached in `path/.act-jax-fingerprint.json` by each file's
  size, mtime, ctime and inode (not where `path` is read-only), so an
  unchanged model costs a few `stat` calls.
  """
  return inputs.dir_fingerprint(path, model_files(path, follow_symlinks),
                                follow_symlinks)


def tokenizer_files_fingerprint(path: str, follow_symlinks: bool = False
                                ) -> dict[str, Any]:
  """Fingerprint of the tokenizer files in `path` (a tokenizer dir that is
  no model dir)."""
  names = [n for n in params_io.AUX_FILES
           if os.path.isfile(os.path.join(path, n))]
  return inputs.dir_fingerprint(path, names, follow_symlinks)
