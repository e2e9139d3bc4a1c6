"""Synthetic abilities: generators of (prompt, answer) records.

Four abilities with disjoint surface forms, so each exercises its own
circuitry in a small model:
  arithmetic  `37+8=` -> `45` (a < 50 plus a digit, 500 facts; exact match)
  lang_a      sentences of an SVO language over `kmnpt` + `aiu` (perplexity)
  lang_b      sentences of an SOV language over `bdglrsvz` + `eoy`, with an
              object particle and verb agreement (perplexity)
  reverse     `CADBE>` -> `EBDAC` (3-5 letters A-F; exact match)
Records are dicts `{'prompt', 'answer', 'text'}`; `text = prompt + answer`.
The two grammars' lexicons are fixed (seeded once), the sentences are drawn
from the caller's rng, so probe, train and eval splits differ only by seed.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

_LEXICON_SEED = 1234


@dataclasses.dataclass(frozen=True)
class Ability:
  """One synthetic ability: how to sample it and how it is scored."""
  name: str
  metric: str  # 'exact_match' (greedy answer) or 'perplexity' (answer tokens)
  sample: Callable[[np.random.RandomState], tuple[str, str]]
  max_answer_chars: int  # generation budget for exact match


def _arithmetic(rng: np.random.RandomState) -> tuple[str, str]:
  a, b = rng.randint(0, 50), rng.randint(0, 10)
  return f'{a}+{b}=', str(a + b)


def _reverse(rng: np.random.RandomState) -> tuple[str, str]:
  n = rng.randint(3, 6)
  s = ''.join(rng.choice(list('ABCDEF'), size=n))
  return s + '>', s[::-1]


def _words(rng, consonants, vowels, n, syllables=(1, 2, 3)):
  out = set()
  while len(out) < n:
    k = rng.choice(syllables)
    out.add(''.join(rng.choice(list(consonants)) + rng.choice(list(vowels))
                    for _ in range(k)))
  return sorted(out)


def _lexicon(consonants: str, vowels: str, offset: int) -> dict:
  rng = np.random.RandomState(_LEXICON_SEED + offset)
  words = _words(rng, consonants, vowels, 34, (2, 3))
  rng.shuffle(words)
  return {'noun': words[:14], 'verb': words[14:24], 'adj': words[24:32],
          'part': words[32:34]}


_LEX_A = _lexicon('kmnpt', 'aiu', 0)
_LEX_B = _lexicon('bdglrsvz', 'eoy', 1)


def _pick(rng, words):
  return words[rng.randint(len(words))]


def _lang_a(rng: np.random.RandomState) -> tuple[str, str]:
  """SVO; adjective after its noun; the verb copies the subject's last vowel."""
  lex = _LEX_A
  subj = _pick(rng, lex['noun'])
  np_s = subj + (' ' + _pick(rng, lex['adj']) if rng.rand() < 0.4 else '')
  verb = _pick(rng, lex['verb']) + subj[-1]
  obj = _pick(rng, lex['noun'])
  np_o = obj + (' ' + _pick(rng, lex['adj']) if rng.rand() < 0.4 else '')
  return '', f'{np_s} {verb} {np_o}.'


def _lang_b(rng: np.random.RandomState) -> tuple[str, str]:
  """SOV; adjective before its noun; object particle; verb suffix by count."""
  lex = _LEX_B
  plural = rng.rand() < 0.5
  subj = _pick(rng, lex['noun']) + ('z' if plural else '')
  if rng.rand() < 0.4:
    subj = _pick(rng, lex['adj']) + ' ' + subj
  obj = _pick(rng, lex['noun'])
  if rng.rand() < 0.4:
    obj = _pick(rng, lex['adj']) + ' ' + obj
  verb = _pick(rng, lex['verb']) + ('ro' if plural else 'le')
  return '', f'{subj} {obj} {lex["part"][0]} {verb}.'


ABILITIES = {
    'arithmetic': Ability('arithmetic', 'exact_match', _arithmetic, 3),
    'lang_a': Ability('lang_a', 'perplexity', _lang_a, 0),
    'lang_b': Ability('lang_b', 'perplexity', _lang_b, 0),
    'reverse': Ability('reverse', 'exact_match', _reverse, 6),
}


def get(name: str) -> Ability:
  """The ability called `name`; KeyError lists the known ones."""
  if name not in ABILITIES:
    raise KeyError(f'unknown toy ability {name!r}; known: '
                   f'{", ".join(ABILITIES)}')
  return ABILITIES[name]


def records(name: str, n: int, seed: int) -> list[dict[str, str]]:
  """`n` records of ability `name` drawn with `seed`."""
  ability = get(name)
  rng = np.random.RandomState(seed)
  out = []
  for _ in range(n):
    prompt, answer = ability.sample(rng)
    out.append({'prompt': prompt, 'answer': answer, 'text': prompt + answer})
  return out


def mixture(weights: dict[str, float], n: int,
            seed: int) -> list[dict[str, str]]:
  """`n` records drawn from abilities in proportion to `weights`."""
  names = sorted(weights)
  p = np.array([weights[k] for k in names], np.float64)
  p = p / p.sum()
  rng = np.random.RandomState(seed)
  choice = rng.choice(len(names), size=n, p=p)
  out = []
  for i in choice:
    prompt, answer = get(names[i]).sample(rng)
    out.append({'prompt': prompt, 'answer': answer, 'text': prompt + answer,
                'ability': names[i]})
  return out
