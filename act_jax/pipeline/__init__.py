"""Orchestration, the only package that reads config: typed jobs, the stage
runner, stage bodies, the candidate registry, pre-flight and the report."""
