"""Evaluation: perplexity, multiple choice, greedy generation with answer
matching, each with per-item outcomes."""
