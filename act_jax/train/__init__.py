"""Fine-tuning: the masked optimizer (channels, modules, full; lean state),
the train loop with resumable checkpoints, metric logs."""
