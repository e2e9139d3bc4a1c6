"""Test setup shared by every test: 8 fake CPU devices, offline Hub, fp32."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import jax  # pylint: disable=g-import-not-at-top

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_default_matmul_precision', 'highest')

# The slow tier: subprocess, SIGKILL, multi-process, whole-pipeline and
# real-weights tests (module, `module::Class` or `module::Class::test`).
# `pytest -m "not slow" tests` is the fast tier a developer runs while
# working; the README's full command (every test) is what CI runs.
SLOW = ()


def pytest_collection_modifyitems(config, items):
  del config  # unused
  import pytest  # pylint: disable=g-import-not-at-top
  for item in items:
    node = item.nodeid.split('tests/', 1)[-1].replace('.py', '')
    if any(node == s or node.startswith(s + '::') for s in SLOW):
      item.add_marker(pytest.mark.slow)
