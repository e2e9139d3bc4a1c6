"""The paper's setting in miniature: synthetic abilities and toy models.

A char-level tokenizer (`tokenizer.py`), generators of four synthetic
abilities (`abilities.py`: two-digit addition, two artificial languages with
disjoint alphabets, string reversal), a small full-parameter training loop
(`train.py`) and the recipe that trains a base on the mixture and continues
it gently into specialists, saved as real HF checkpoints (`build.py`).
"""
