"""The method, one module per step (docs/method.md): collect, localize,
masks, transfer, baselines, analysis. No flags, no config objects."""
