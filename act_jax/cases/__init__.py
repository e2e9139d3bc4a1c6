"""Case builders: the models and data of a study, chosen by name.

`config.case.name = '<name>'` makes the pipeline's build_models stage call
`act_jax.cases.<name>.build.build(case_config, out_dir)`. The core never
imports a case; a case may use every part of the core.
"""
