"""A real forgetting case on SmolLM2-135M-Instruct, built end to end.

`conlang.py` turns English prose found in the Python standard library into a
'new language' (a deterministic word-level constructed language); `qa.py`
holds a small hand-written factual QA set; `corpus.py` writes every data set
of the case (conlang training text, held-out English and conlang text, QA
eval/probe/fine-tune splits) as JSONL; `run.py` builds the specialist with
act-jax's own fine-tuning loop and runs the recover sweep, the baselines and
the four analyses, and writes the report.
"""
