"""A small hand-written English QA set: short factual questions, short answers.

Each item is `(category, question, answers)`: the first answer is the one
used as the fine-tuning / probe response; every answer is accepted when
scoring a generation (`eval.metrics` match 'contains': case-insensitive,
whole-word match inside the first line of the reply). Categories: capitals, arithmetic, opposites, colours,
animals, science and general knowledge, English grammar.

`split_items` divides the set deterministically, per category, into an
evaluation half and a training half (probe set for localization and data for
the compatibility fine-tune); the halves never share a question.
`split_three` does the same for any item list (this set plus the
package-built facts of facts.py) with a dev split between the two.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple


class QAItem(NamedTuple):
  """One question with its accepted answers (first = canonical)."""
  category: str
  question: str
  answers: tuple[str, ...]


_CAPITALS = (
    ('France', 'Paris'), ('Germany', 'Berlin'), ('Italy', 'Rome'),
    ('Spain', 'Madrid'), ('Japan', 'Tokyo'), ('China', 'Beijing'),
    ('Russia', 'Moscow'), ('the United Kingdom', 'London'),
    ('Egypt', 'Cairo'), ('Canada', 'Ottawa'), ('Australia', 'Canberra'),
    ('Greece', 'Athens'), ('Portugal', 'Lisbon'), ('Ireland', 'Dublin'),
    ('Norway', 'Oslo'), ('Sweden', 'Stockholm'), ('Finland', 'Helsinki'),
    ('Denmark', 'Copenhagen'), ('Poland', 'Warsaw'), ('Austria', 'Vienna'),
    ('Hungary', 'Budapest'), ('the Czech Republic', 'Prague'),
    ('the Netherlands', 'Amsterdam'), ('Belgium', 'Brussels'),
    ('Turkey', 'Ankara'), ('Argentina', 'Buenos Aires'), ('Peru', 'Lima'),
    ('Kenya', 'Nairobi'), ('South Korea', 'Seoul'), ('Thailand', 'Bangkok'),
    ('Vietnam', 'Hanoi'), ('Indonesia', 'Jakarta'),
    ('the Philippines', 'Manila'), ('Cuba', 'Havana'), ('Iran', 'Tehran'),
    ('Iraq', 'Baghdad'), ('Saudi Arabia', 'Riyadh'), ('Chile', 'Santiago'),
    ('Venezuela', 'Caracas'), ('Switzerland', 'Bern'),
)
_CAPITAL_ALIASES = {'Bern': ('Berne',)}

_ARITHMETIC = (
    (2, '+', 3), (4, '+', 5), (7, '+', 1), (6, '+', 6), (10, '+', 10),
    (3, '+', 4), (8, '+', 2), (5, '+', 5), (9, '+', 1), (1, '+', 1),
    (20, '+', 30), (12, '+', 3), (9, '-', 4), (10, '-', 3), (8, '-', 8),
    (15, '-', 5), (7, '-', 2), (100, '-', 1), (2, '*', 3), (4, '*', 5),
    (3, '*', 3), (10, '*', 10), (6, '*', 2), (5, '*', 4), (7, '*', 2),
    (9, '*', 2),
)
_NUMBER_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six',
                 'seven', 'eight', 'nine', 'ten', 'eleven', 'twelve')

_OPPOSITES = (
    ('hot', 'cold'), ('up', 'down'), ('big', 'small', 'little'),
    ('day', 'night'), ('black', 'white'), ('left', 'right'),
    ('open', 'closed', 'close', 'shut'), ('fast', 'slow'),
    ('happy', 'sad', 'unhappy'), ('yes', 'no'), ('wet', 'dry'),
    ('light', 'dark', 'heavy'), ('high', 'low'), ('full', 'empty'),
    ('early', 'late'), ('true', 'false'), ('win', 'lose'),
    ('north', 'south'), ('east', 'west'), ('love', 'hate'),
    ('buy', 'sell'), ('tall', 'short'), ('rich', 'poor'),
    ('inside', 'outside'),
)

_GENERAL = (
    ('colour', 'What color is the sky on a clear day?', ('blue',)),
    ('colour', 'What color is grass?', ('green',)),
    ('colour', 'What color is fresh snow?', ('white',)),
    ('colour', 'What color is blood?', ('red',)),
    ('colour', 'What color is a ripe banana?', ('yellow',)),
    ('colour', 'What color is coal?', ('black',)),
    ('colour', 'What color do you get by mixing blue and yellow?',
     ('green',)),
    ('colour', 'What color do you get by mixing red and white?', ('pink',)),
    ('colour', 'What color are most clouds?', ('white', 'gray', 'grey')),
    ('colour', 'What color is a ripe tomato?', ('red',)),
    ('animal', 'Which animal says moo?', ('cow', 'cows', 'cattle')),
    ('animal', 'Which animal barks?', ('dog', 'dogs')),
    ('animal', 'Which animal says meow?', ('cat', 'cats', 'kitten')),
    ('animal', 'How many legs does a spider have?', ('eight', '8')),
    ('animal', 'How many legs does an insect have?', ('six', '6')),
    ('animal', 'Which animal is called the king of the jungle?',
     ('lion',)),
    ('animal', 'What is the fastest land animal?', ('cheetah',)),
    ('animal', 'Which animal has the longest neck?', ('giraffe',)),
    ('animal', 'Which bird cannot fly and lives in Antarctica?',
     ('penguin', 'penguins')),
    ('animal', 'What do bees make?', ('honey',)),
    ('animal', 'What is a baby dog called?', ('puppy', 'pup')),
    ('animal', 'What is a baby cat called?', ('kitten', 'kitty')),
    ('animal', 'What is the largest animal on Earth?',
     ('blue whale', 'whale')),
    ('animal', 'How many legs does a dog have?', ('four', '4')),
    ('science', 'Which planet do we live on?', ('Earth',)),
    ('science', 'What is the star at the center of our solar system?',
     ('Sun',)),
    ('science', 'What is the largest planet in our solar system?',
     ('Jupiter',)),
    ('science', 'Which planet is known as the Red Planet?', ('Mars',)),
    ('science', 'How many days are in a week?', ('seven', '7')),
    ('science', 'How many months are in a year?', ('twelve', '12')),
    ('science', 'How many hours are in a day?', ('24', 'twenty-four')),
    ('science', 'How many minutes are in an hour?', ('60', 'sixty')),
    ('science', 'At what temperature in Celsius does water freeze?',
     ('0', 'zero')),
    ('science', 'At what temperature in Celsius does water boil?',
     ('100', 'one hundred')),
    ('science', 'What gas do humans need to breathe to live?',
     ('oxygen',)),
    ('science', 'What gas do plants take in from the air?',
     ('carbon dioxide', 'CO2')),
    ('science', 'What is the chemical formula of water?', ('H2O',)),
    ('science', 'What is frozen water called?', ('ice',)),
    ('science', 'What is the chemical symbol for gold?', ('Au',)),
    ('science', 'What force pulls objects toward the Earth?',
     ('gravity',)),
    ('science', 'What is the natural satellite of the Earth called?',
     ('Moon',)),
    ('science', 'How many continents are there on Earth?', ('seven', '7')),
    ('general', 'Who wrote Romeo and Juliet?', ('Shakespeare',)),
    ('general', 'Who painted the Mona Lisa?', ('Leonardo', 'da Vinci')),
    ('general', 'Who was the first president of the United States?',
     ('Washington',)),
    ('general', 'What is the largest ocean on Earth?', ('Pacific',)),
    ('general', 'What is the tallest mountain in the world?',
     ('Everest',)),
    ('general', 'What is the longest river in Africa?', ('Nile',)),
    ('general', 'What language is spoken in Brazil?', ('Portuguese',)),
    ('general', 'What language is mainly spoken in Mexico?', ('Spanish',)),
    ('general', 'What language is spoken in France?', ('French',)),
    ('general', 'What is the currency of Japan?', ('yen',)),
    ('general', 'What is the currency of the United States?',
     ('dollar', 'dollars', 'USD')),
    ('general', 'What is the largest country in the world by area?',
     ('Russia',)),
    ('general', 'On which continent is Egypt?', ('Africa',)),
    ('general', 'On which continent is Brazil?', ('South America',)),
    ('general', 'What do we call the season after summer?',
     ('autumn', 'fall')),
    ('general', 'What is the first letter of the English alphabet?',
     ('A',)),
    ('general', 'How many sides does a triangle have?', ('three', '3')),
    ('general', 'How many sides does a square have?', ('four', '4')),
    ('general', 'What do you call a shape with eight sides?', ('octagon',)),
    ('grammar', 'What is the plural of mouse?', ('mice',)),
    ('grammar', 'What is the plural of child?', ('children',)),
    ('grammar', 'What is the plural of foot?', ('feet',)),
    ('grammar', 'What is the plural of tooth?', ('teeth',)),
    ('grammar', 'What is the plural of man?', ('men',)),
    ('grammar', 'What is the plural of woman?', ('women',)),
    ('grammar', 'What is the plural of goose?', ('geese',)),
    ('grammar', 'What is the past tense of go?', ('went',)),
    ('grammar', 'What is the past tense of eat?', ('ate',)),
    ('grammar', 'What is the past tense of run?', ('ran',)),
    ('grammar', 'What is the past tense of see?', ('saw',)),
    ('grammar', 'What is the past tense of write?', ('wrote',)),
    ('grammar', 'What is the past tense of swim?', ('swam',)),
    ('grammar', 'What is the past tense of buy?', ('bought',)),
)

_OPS = {'+': ('plus', lambda a, b: a + b), '-': ('minus', lambda a, b: a - b),
        '*': ('times', lambda a, b: a * b)}


def _arith_answers(value: int) -> tuple[str, ...]:
  if 0 <= value < len(_NUMBER_WORDS):
    return (str(value), _NUMBER_WORDS[value])
  return (str(value),)


def all_items() -> list[QAItem]:
  """Every QA item, in a fixed order."""
  items = []
  for country, city in _CAPITALS:
    items.append(QAItem('capital', f'What is the capital of {country}?',
                        (city,) + _CAPITAL_ALIASES.get(city, ())))
  for a, op, b in _ARITHMETIC:
    word, fn = _OPS[op]
    items.append(QAItem('arithmetic', f'What is {a} {word} {b}?',
                        _arith_answers(fn(a, b))))
  for word, *opposite in _OPPOSITES:
    items.append(QAItem('opposite', f'What is the opposite of "{word}"?',
                        tuple(opposite)))
  items.extend(QAItem(c, q, a) for c, q, a in _GENERAL)
  return items


def _rank(seed: int, item: QAItem) -> bytes:
  return hashlib.sha256(f'{seed}:{item.question}'.encode()).digest()


def split_three(items: list[QAItem], seed: int = 0, eval_frac: float = 0.5,
                dev_frac: float = 0.0
               ) -> tuple[list[QAItem], list[QAItem], list[QAItem]]:
  """(eval, dev, train): per category, items ranked by a seeded hash of the
  question; the first `eval_frac` are eval (the test split), the next
  `dev_frac` dev, the rest train. With `dev_frac=0` the eval half is the
  one `split_items` always gave, so older studies' test sets stand."""
  if not (0 <= eval_frac <= 1 and 0 <= dev_frac <= 1 - eval_frac):
    raise ValueError(f'QA split fractions eval={eval_frac} dev={dev_frac}: '
                     'need 0 <= eval, 0 <= dev and eval + dev <= 1')
  by_cat: dict[str, list[QAItem]] = {}
  for item in items:
    by_cat.setdefault(item.category, []).append(item)
  evals, devs, trains = [], [], []
  for cat in sorted(by_cat):
    ranked = sorted(by_cat[cat], key=lambda it: _rank(seed, it))
    n_eval = round(len(ranked) * eval_frac)
    n_dev = round(len(ranked) * dev_frac)
    evals.extend(ranked[:n_eval])
    devs.extend(ranked[n_eval:n_eval + n_dev])
    trains.extend(ranked[n_eval + n_dev:])
  return evals, devs, trains


def split_items(seed: int = 0, eval_frac: float = 0.5
               ) -> tuple[list[QAItem], list[QAItem]]:
  """(eval, train) of the hand-written set: per category, a seeded
  `eval_frac` of items is eval."""
  evals, _, trains = split_three(all_items(), seed, eval_frac)
  return evals, trains
