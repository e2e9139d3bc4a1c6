"""What every act-jax command line shares.

`run(main)` is `absl.app.run` with one rule: a bad flag, a missing input or
any pre-flight error prints ONE line naming what to fix (`error: ...`) and
exits with status 2, no traceback; so does a write the file system refused
(disk full, file too large, read-only), with the real cause on that line.
Unexpected errors keep their traceback, followed by a last `error:` line,
so the cause is never buried under shutdown noise.
`define_output_flags()` defines the flags every writing CLI shares:
`--overwrite`, `--follow_symlinks` (and `--restart` for a resumable one).
`define_section_flags(cls)` defines one flag per field of a config section
dataclass, named exactly as the config field and documented by the field's
own trailing comment, so `--top_frac` of `act_jax.localize` is
`--config.localize.top_frac` of `act_jax.main`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import re
import sys
import textwrap
import traceback
import typing
from typing import Any, Callable

from absl import app
from absl import flags

from act_jax import data
from act_jax.act import localize
from act_jax.act import masks
from act_jax.act import transfer
from act_jax.io import atomic
from act_jax.io import hf
from act_jax.io import inputs
from act_jax.io import models
from act_jax.io import params
from act_jax.io import stats
from act_jax.model import config as model_config
from act_jax.pipeline import jobs
from act_jax.pipeline import preflight
from act_jax.pipeline import runner

# Errors that are the user's to fix: shown as one line, exit status 2.
USER_ERRORS = (
    app.UsageError, jobs.ConfigError, preflight.PreflightError,
    runner.StageError, data.DataError, data.TemplateError,
    models.ModelDirError, hf.ConversionError, params.CheckpointError,
    model_config.ConfigError, masks.MaskError, localize.ScoreError,
    localize.SelectError, localize.LocalizeError, transfer.TransferError,
    stats.StatsError, FileExistsError, FileNotFoundError,
    atomic.LockedError, atomic.WriteError, inputs.UnsafeInputError,
    inputs.InputChangedError,
)


def one_line(message: Any) -> str:
  """`message` on one line (its lines joined by '; ')."""
  return '; '.join(s.strip() for s in str(message).splitlines() if s.strip())


def _exit(status: int) -> None:
  """Exits now: flushed, without running exit handlers whose output (orbax
  and JAX shutdown) would come after the error line."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)  # pylint: disable=protected-access


def fail(message: str) -> None:
  """Prints `error: <message>` on one line to stderr and exits with 2."""
  print(f'error: {one_line(message)}', file=sys.stderr)
  _exit(2)


def run(main: Callable[[list[str]], Any]) -> None:
  """`app.run(main)` with one-line errors (see module docstring)."""

  def parse(argv):
    if any(a in ('--help', '-h', '--helpshort', '-?') for a in argv[1:]):
      # absl's --help exits 1; help that was asked for is a success.
      print(flags.FLAGS.main_module_help() or flags.FLAGS.get_help())
      _exit(0)
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      fail(f'{e} (see --help)')
    except (KeyError, AttributeError, TypeError, ValueError) as e:
      # ml_collections' config_flags parse --config.<path>=v overrides here:
      # a typo'd field is a KeyError / AttributeError with its own
      # 'Did you mean ...' line.
      fail(_override_error(argv, e))

  def wrapped(argv):
    try:
      return main(argv)
    except USER_ERRORS as e:
      fail(f'{type(e).__name__}: {e}' if isinstance(
          e, (FileExistsError, FileNotFoundError)) and not isinstance(
              e, atomic.OutputError) else str(e))
    except Exception as e:  # pylint: disable=broad-except
      cause = atomic.write_failure(e)
      if cause:
        fail(f'a write failed: {cause}')
      traceback.print_exc()
      print(f'error: {type(e).__name__}: {one_line(e)[:500]}',
            file=sys.stderr)
      _exit(1)

  app.run(wrapped, flags_parser=parse)


def _override_error(argv: list[str], e: Exception) -> str:
  """One line for a bad `--config.<path>=value` override: the flag, the
  closest valid field (ml_collections' own suggestion) and where to look."""
  text = str(e.args[0] if e.args else e).replace('\\n', '\n')
  bad = re.match(r"\W*'?([^'\n\\]+)", text)
  bad = bad.group(1) if bad else ''
  arg = next((a.split('=', 1)[0] for a in argv if a.startswith('--config.')
              and bad and bad in a.split('=', 1)[0].split('.')), '--config')
  near = re.search(r'Did you mean "([^"]+)"', text)
  if isinstance(e, (KeyError, AttributeError)):
    hint = f'; did you mean {near.group(1)!r}?' if near else ''
    return (f'{arg}: no config field {bad!r}{hint} (--help_config lists '
            'every field)')
  return f'{arg}: a bad value ({one_line(text)[:300]})'


def define_output_flags(restart: bool = False) -> None:
  """`--overwrite`, `--follow_symlinks` and, for a resumable CLI,
  `--restart`: the rules of outputs and inputs (io/atomic.py, io/inputs.py).
  """
  flags.DEFINE_bool('overwrite', False, 'Replace an existing output, if it '
                    'is an act-jax artifact of the same kind (never one of '
                    'the inputs, nor a folder act-jax did not write).')
  flags.DEFINE_bool('follow_symlinks', False, 'Read checkpoint files that are '
                    'symlinks resolving outside their checkpoint dir (needed '
                    "for the HF hub cache's snapshots/ -> blobs/ layout).")
  if restart:
    flags.DEFINE_bool('restart', False, 'Discard the interrupted run\'s '
                      'checkpoint (OUT.ckpt) and start over, instead of '
                      'resuming.')


def field_help(cls) -> dict[str, str]:
  """`{field: its trailing comment}` from the dataclass's source."""
  out = {}
  for klass in reversed(cls.__mro__):
    if not dataclasses.is_dataclass(klass):
      continue
    try:
      src = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):
      continue
    lines = src.splitlines()
    for node in ast.walk(ast.parse(src)):
      if isinstance(node, ast.AnnAssign) and isinstance(node.target,
                                                        ast.Name):
        text = _comment_at(lines, node.end_lineno - 1)
        if text:
          out[node.target.id] = text
  return out


def _comment_at(lines: list[str], i: int) -> str:
  """The trailing comment of line `i` with the comment-only lines that
  continue it (a help text wrapped over several lines)."""
  if '#' not in lines[i]:
    return ''
  parts = [lines[i].split('#', 1)[1].strip()]
  for line in lines[i + 1:]:
    if not line.strip().startswith('#'):
      break
    parts.append(line.strip()[1:].strip())
  return ' '.join(parts)


def config_help() -> str:
  """Every field of `act_jax.main`'s config, `--config.<path> (default):
  help`, from the schema's own comments (`--help_config`)."""
  src = inspect.getsource(jobs).splitlines()
  out = ['Config fields (override as --config.<field>=value):']

  def literal_help(name):  # 'name': value,  # help (TOP_FIELDS, recover, ..)
    for i, line in enumerate(src):
      if line.strip().startswith((f"'{name}':", f'{name}=')):
        return _comment_at(src, i)
    return ''

  c = jobs.default_config()
  for name in jobs.TOP_FIELDS:
    out.append(f'  --config.{name} ({c[name]!r}): {literal_help(name)}')
  for sec in ('recover', 'merge'):
    for name in c[sec]:
      out.append(f'  --config.{sec}.{name} ({c[sec][name]!r}): '
                 f'{literal_help(name)}')
  sections = dict(jobs.SECTIONS, **{'abilities.<name>': jobs.AbilityConfig})
  for sec, cls in sections.items():
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
      out.append(f'  --config.{sec}.{f.name} ({f.default!r}): '
                 f'{helps.get(f.name, "")}')
  out += ['  --config.models.<name>: a model (HF dir, params dir or Hub id)',
          '  --config.case.name: a case builder (act_jax/cases/<name>); its '
          'fields are documented in that module']
  return '\n'.join(out)


def define_section_flags(cls, only: tuple[str, ...] | None = None,
                         defaults: dict[str, Any] | None = None,
                         rename: dict[str, str] | None = None) -> None:
  """One absl flag per field of the config-section dataclass `cls`.

  Args:
    cls: a section dataclass (jobs.CollectConfig, ...).
    only: the fields to define (default all).
    defaults: other defaults than the dataclass's.
    rename: `{field: flag name}` for a field whose name would clash.
  """
  hints = typing.get_type_hints(cls)
  helps = field_help(cls)
  # The flags belong to the calling CLI module, so its --help lists them
  # with its own (absl names the main module after sys.argv[0]).
  caller = sys._getframe(1).f_globals.get('__name__', '')  # pylint: disable=protected-access
  module = sys.argv[0] if caller == '__main__' else caller
  for f in dataclasses.fields(cls):
    if not f.init or (only is not None and f.name not in only):
      continue
    name = (rename or {}).get(f.name, f.name)
    default = (defaults or {}).get(f.name, f.default)
    doc = helps.get(f.name, f.name)
    kind = hints[f.name]
    if kind is bool:
      flags.DEFINE_bool(name, default, doc, module_name=module)
    elif kind is int:
      flags.DEFINE_integer(name, default, doc, module_name=module)
    elif kind is float:
      flags.DEFINE_float(name, default, doc, module_name=module)
    else:
      flags.DEFINE_string(name, default, doc, module_name=module)


def section_from_flags(cls, fl, only: tuple[str, ...] | None = None,
                       rename: dict[str, str] | None = None):
  """`cls(**flag values)` for the fields `define_section_flags` defined."""
  values = {}
  for f in dataclasses.fields(cls):
    if f.init and (only is None or f.name in only):
      values[f.name] = getattr(fl, (rename or {}).get(f.name, f.name))
  return cls(**values)
