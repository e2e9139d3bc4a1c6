"""Packaging: metadata in setup.cfg; pins come from requirements*.txt only."""
import pathlib

import setuptools


def _reqs(name):
  lines = pathlib.Path(__file__).with_name(name).read_text().splitlines()
  return [l.strip() for l in lines if l.strip() and not l.startswith('#')]


setuptools.setup(
    install_requires=_reqs('requirements.txt'),
    extras_require={
        'test': _reqs('requirements-test.txt') + _reqs(
            'requirements-lm-eval.txt'),
        'lm_eval': _reqs('requirements-lm-eval.txt'),
    },
)
