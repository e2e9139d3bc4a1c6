"""The paper's setting in miniature: synthetic abilities and toy models.

A char-level tokenizer (`tokenizer.py`), generators of four synthetic
abilities (`abilities.py`: two-digit addition, two artificial languages with
disjoint alphabets, string reversal) and the recipe that trains a base on
the mixture and continues it gently into specialists with
`act_jax.train.finetune` (scope 'full'), saved as real HF checkpoints
(`build.py`).
"""
