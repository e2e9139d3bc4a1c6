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
# real-weights tests, and the numerical oracles over ~10 s (module,
# `module::Class` or `module::Class::test`), chosen from `pytest
# --durations=0` of the whole suite (31.5 min on 2 cores, 2026-12-08).
# `pytest -m "not slow" tests` is the fast tier a developer runs while
# working (the rest: about 4 minutes); the README's full command (every
# test) is what CI runs.
SLOW = (
    # whole pipeline, subprocesses, SIGKILL, jax.distributed
    'main_test', 'faults_test', 'benchmarks_test',
    'collect_multiprocess_test', 'chat_recover_test', 'recipe_test',
    'smollm2_merge_test', 'smollm2_case_test::PipelineTest',
    'smollm2_case_test::SpecialistCacheTest',
    'smollm2_strength_test::StudyTest', 'pipeline_test::NewBaselineTest',
    'pipeline_test::CliTest', 'probe_holes_test::CliLinesTest',
    'probe_holes_test::PipelineHolesTest', 'safety_test::ResumeTest',
    'safety_test::OneWriterTest', 'params_test::CliTest',
    'localize_cli_test::PlantedTest', 'hub_test', 'lm_eval_test',
    'train_test::TrainTest::test_kill_and_resume_gives_same_params',
    # numerical oracles over ~10 s each
    'stream_test::StreamTest::test_baselines_equal_in_memory',
    'toy_test::MetricsTest::test_greedy_matches_a_step_by_step_loop',
    'model_test::InvariantsTest::test_remat_keeps_loss_and_gradients',
    'model_test::InvariantsTest::test_packed_documents_equal_separate_forwards',
    'optim_test::OptimTest::test_channels_freeze_bitwise_and_four_paths_match',
    'collect_precision_test', 'attribution_test::AttributionTest::'
    'test_attribution_equals_torch_autograd',
    'train_test::TrainTest::test_grad_accum_and_bf16',
    'train_test::TrainTest::test_sharded_matches_single_device',
    'generate_test::GenerateTest::test_cache_equals_recompute_and_hf',
)


def pytest_collection_modifyitems(config, items):
  del config  # unused
  import pytest  # pylint: disable=g-import-not-at-top
  for item in items:
    node = item.nodeid.split('tests/', 1)[-1].replace('.py', '')
    if any(node == s or node.startswith(s + '::') for s in SLOW):
      item.add_marker(pytest.mark.slow)
