"""A real forgetting case on SmolLM2-135M-Instruct, built end to end.

`conlang.py` turns English prose found in the Python standard library into a
'new language' (a deterministic word-level constructed language); `qa.py`
holds a small hand-written factual QA set; `corpus.py` writes every data set
of the case as JSONL; `weights.py` builds the real SmolLM2 weights offline;
`build.py` (the build_models stage of `configs/smollm2_recover.py` and
`configs/smollm2_merge.py`) trains the specialists with act-jax's own
fine-tuning loop and hands models and data to the pipeline.
"""
