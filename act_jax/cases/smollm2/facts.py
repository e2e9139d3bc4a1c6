"""Factual QA items built offline from a package-shipped fact source.

The source is the `countryinfo` package (MIT; pinned in requirements.txt):
one JSON file per country under its `data/` folder, read directly (the
package is located, never imported, and nothing touches the network). Kinds
of question (`KINDS`), each a category of its own:

  country_capital      What is the capital of X?           the capital
  country_continent    On which continent is X?            the region
                       (Americas: 'America'; Oceania: also 'Australia')
  country_nationality  What is the nationality of someone from X?  the
                       demonym(s)
  country_border       Name a country that borders X.      every neighbour
Accepted answers are lists: the canonical answer first, then aliases (an
ASCII-folded spelling, a few well-known alternative names, the neighbours'
alternative spellings), scored by `eval.metrics` match 'contains'. Items
whose answer already occurs in the question (the capital of Luxembourg) are
dropped, as are territories under `min_population` inhabitants and records
without a region or a capital (the source has a few duplicates and
historical entries). Same package version, same items, in a fixed order.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import unicodedata
from typing import Any

from act_jax.cases.smollm2 import qa

PACKAGE = 'countryinfo'
KINDS = ('capital', 'continent', 'nationality', 'border')
CATEGORY = 'country_{}'
# Records the source keeps that are not current countries or territories.
_SKIP = ('Serbia and Montenegro', 'Antilles néerlandaises',
         'Palestine, State of', 'Holy See (Vatican City State)')
_CAPITAL_ALIASES = {
    'Nur-Sultan': ('Astana',), 'Kyiv': ('Kiev',), 'Bern': ('Berne',),
    'Washington D.C.': ('Washington',), "Sana'a": ('Sanaa',),
    'Naypyidaw': ('Nay Pyi Taw', 'Naypyitaw'), 'Beijing': ('Peking',),
    'Ulaanbaatar': ('Ulan Bator',),
}
_CONTINENTS = {'Americas': ('America', 'the Americas'),
               'Oceania': ('Oceania', 'Australia'),
               'Europe': ('Europe',), 'Asia': ('Asia',),
               'Africa': ('Africa',)}
# Names read with a definite article in a question.
_THE = ('Netherlands', 'Philippines', 'Maldives', 'Comoros', 'Seychelles',
        'Bahamas', 'Gambia', 'Vatican City State')


class FactsError(RuntimeError):
  """The fact source is missing or unreadable; names the package."""


def data_dir() -> str:
  """The `countryinfo` package's data folder (without importing it)."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FactsError(f'the fact source needs the {PACKAGE!r} package: pip '
                     'install -r requirements.txt (countryinfo==1.0.1)')
  path = os.path.join(list(spec.submodule_search_locations)[0], 'data')
  if not os.path.isdir(path):
    raise FactsError(f'{path}: the {PACKAGE} package has no data folder')
  return path


def load_countries(path: str | None = None) -> list[dict[str, Any]]:
  """Every country record of the source, sorted by file name."""
  files = sorted(glob.glob(os.path.join(path or data_dir(), '*.json')))
  if not files:
    raise FactsError(f'{path or data_dir()}: no country JSON files')
  out = []
  for f in files:
    with open(f, encoding='utf-8') as fh:
      out.append(json.load(fh))
  return out


def ascii_fold(text: str) -> str:
  """'Brasília' -> 'Brasilia' (accents dropped, other non-ASCII removed)."""
  return unicodedata.normalize('NFKD', text).encode(
      'ascii', 'ignore').decode().strip()


def _with_aliases(*names: str) -> tuple[str, ...]:
  """Distinct spellings, each also ASCII-folded; non-Latin ones dropped."""
  out = []
  for n in names:
    n = n.strip()
    if not re.search('[A-Za-z]', ascii_fold(n)):
      continue  # a spelling in another script: never in an English reply
    for v in (n, ascii_fold(n)):
      if v not in out:
        out.append(v)
  return tuple(out)


def display_name(name: str) -> str:
  """The country as a question names it ('the United Kingdom')."""
  if name.startswith('The '):
    return 'the ' + name[4:]
  if (name in _THE or name.startswith(('United ', 'Republic of',
                                       'Democratic Republic', 'Federated')) or
      name.endswith(('Islands', 'Republic', 'Emirates'))):
    return 'the ' + name
  return name


def _words(text: str) -> str:
  return ' ' + re.sub(r'[^a-z0-9]+', ' ', text.lower()).strip() + ' '


def _in_question(answers, question: str) -> bool:
  q = _words(question)
  return any(_words(a) in q for a in answers if _words(a).strip())


def _countries(min_population: int) -> list[dict[str, Any]]:
  seen, out = set(), []
  for r in load_countries():
    name, cap = r.get('name'), r.get('capital')
    if (not name or name in seen or name in _SKIP or not r.get('region') or
        not isinstance(cap, str) or not cap.strip() or
        (r.get('population') or 0) < min_population):
      continue
    seen.add(name)
    out.append(r)
  return out


def fact_items(kinds=KINDS, min_population: int = 0,
               per_kind: int = 0) -> list[qa.QAItem]:
  """QA items of the given kinds, in a fixed order (`per_kind` > 0 keeps
  the first that many of each kind: the tests' toy size)."""
  unknown = [k for k in kinds if k not in KINDS]
  if unknown:
    raise ValueError(f'unknown fact kinds {unknown}; known: '
                     f'{", ".join(KINDS)}')
  countries = _countries(min_population)
  by_code = {r['ISO']['alpha3']: r for r in load_countries()
             if r.get('ISO', {}).get('alpha3') and r.get('name')}
  out = []
  for kind in kinds:
    items = []
    for r in countries:
      x = display_name(r['name'])
      if kind == 'capital':
        q = f'What is the capital of {x}?'
        a = _with_aliases(r['capital'],
                          *_CAPITAL_ALIASES.get(r['capital'], ()))
      elif kind == 'continent':
        q = f'On which continent is {x}?'
        a = _CONTINENTS.get(r['region'], ())
      elif kind == 'nationality':
        q = f'What is the nationality of someone from {x}?'
        a = _with_aliases(*re.split('[,/]', r.get('demonym') or ''))
      else:
        q = f'Name a country that borders {x}.'
        names = []
        for code in r.get('borders') or ():
          n = by_code.get(code)
          if n is not None:
            names += [n['name']] + [s for s in n.get('altSpellings', ())
                                    if len(s) > 4]
        a = _with_aliases(*names)
      if a and not _in_question(a, q):
        items.append(qa.QAItem(CATEGORY.format(kind), q, a))
    out += items[:per_kind] if per_kind else items
  return out
