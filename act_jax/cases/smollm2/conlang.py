"""A deterministic constructed language ('Velarin') derived from English.

Every English word maps, through a seeded SHA-256 hash, to a pseudo-word of
one to three syllables drawn from a small phonology; the mapping is the same
for every occurrence, so the result is a consistent language the model has
never seen (new vocabulary, English word order). Capitalisation, digits and
punctuation are kept. A few frequent function words get fixed short forms so
the text has the skewed word frequencies of a natural language.

The English source is prose found in every CPython install: the paragraphs of
`pydoc_data.topics` (the language reference as plain text) and of the
docstrings of the standard library's modules, classes and functions (read
with `ast`, nothing imported). No download; the same text on every machine
with the same Python minor version (`corpus.py` records a digest).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import re
import sysconfig

_ONSETS = ('k', 't', 'v', 'r', 'l', 'm', 'n', 's', 'z', 'd', 'g', 'b', 'p',
           'th', 'sh', 'kr', 'tr', 'vl', 'dr', 'h')
_VOWELS = ('a', 'e', 'i', 'o', 'u', 'ai', 'ou', 'ei')
_CODAS = ('', '', '', 'n', 'r', 'l', 'k', 's', 'm')
# Short fixed forms for the most frequent English function words.
_FUNCTION_WORDS = {
    'the': 'ka', 'a': 'e', 'an': 'e', 'of': 'ru', 'to': 'ti', 'and': 'vo',
    'is': 'sa', 'in': 'mi', 'it': 'lo', 'that': 'zen', 'for': 'pra',
    'be': 'sai', 'are': 'san', 'as': 'ko', 'with': 'dul', 'or': 'vu',
    'this': 'zei', 'not': 'nai', 'by': 'bo', 'on': 'tu',
}
_WORD_RE = re.compile(r'[A-Za-z]+|[^A-Za-z]+')


def conlang_word(word: str, seed: int = 0) -> str:
  """The constructed-language form of one English word (case-preserving)."""
  lower = word.lower()
  if seed == 0 and lower in _FUNCTION_WORDS:
    out = _FUNCTION_WORDS[lower]
  else:
    digest = hashlib.sha256(f'{seed}:{lower}'.encode()).digest()
    n_syll = 1 + (len(lower) >= 4) + (len(lower) >= 8)
    parts = []
    for i in range(n_syll):
      b0, b1, b2 = digest[3 * i], digest[3 * i + 1], digest[3 * i + 2]
      coda = _CODAS[b2 % len(_CODAS)] if i == n_syll - 1 else ''
      parts.append(_ONSETS[b0 % len(_ONSETS)] + _VOWELS[b1 % len(_VOWELS)] +
                   coda)
    out = ''.join(parts)
  if word[:1].isupper():
    out = out[:1].upper() + out[1:]
  return out


def translate(text: str, seed: int = 0) -> str:
  """Translates English `text` word by word; non-letters are kept."""
  return ''.join(
      conlang_word(t, seed) if t[0].isalpha() else t
      for t in _WORD_RE.findall(text))


def _is_prose(paragraph: str) -> bool:
  lines = paragraph.split('\n')
  if any(line.startswith('   ') for line in lines):  # code, grammar, tables
    return False
  if set(lines[-1].strip()) <= set('*=-'):  # section underlines
    return False
  text = ' '.join(line.strip() for line in lines)
  if len(text) < 160:
    return False
  letters = sum(ch.isalpha() or ch == ' ' for ch in text)
  return letters / len(text) > 0.88


def _prose_of(raw: str) -> list[str]:
  out = []
  for para in re.split(r'\n\s*\n', raw):
    para = para.strip('\n')
    if para and _is_prose(para):
      out.append(re.sub(r'\s+', ' ', para).strip())
  return out


_SKIP_DIRS = ('test', 'tests', 'site-packages', 'dist-packages', 'idlelib',
              'lib2to3', 'turtledemo', '__pycache__')


def _stdlib_docstrings() -> list[str]:
  lib = sysconfig.get_paths()['stdlib']
  out = []
  for root, dirs, files in os.walk(lib):
    dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
    for name in sorted(files):
      if not name.endswith('.py'):
        continue
      try:
        with open(os.path.join(root, name), encoding='utf-8') as f:
          tree = ast.parse(f.read())
      except (SyntaxError, UnicodeDecodeError, ValueError):
        continue
      for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                             ast.AsyncFunctionDef)):
          doc = ast.get_docstring(node)
          if doc:
            out.append(doc)
  return out


def english_paragraphs(stdlib_docstrings: bool = True) -> list[str]:
  """Prose paragraphs of the Python reference (+ stdlib docstrings).

  Returns them whitespace-normalised and deduplicated, in a fixed order
  (sorted topic names, then sorted stdlib file paths, document order).
  """
  return list(_paragraphs(stdlib_docstrings))


@functools.lru_cache(maxsize=2)
def _paragraphs(stdlib_docstrings: bool) -> tuple[str, ...]:
  # Cached: parsing the stdlib takes seconds and every split reads it.
  # Lazy: a 700 kB module of text, read once when the corpus is built.
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  raws = [topics.topics[k] for k in sorted(topics.topics)]
  if stdlib_docstrings:
    raws += _stdlib_docstrings()
  seen, out = set(), []
  for raw in raws:
    for text in _prose_of(raw):
      if text not in seen:
        seen.add(text)
        out.append(text)
  return tuple(out)
