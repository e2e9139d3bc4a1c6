"""The network: config, decoder, pure forward, capture, sharding, generation,
losses. Imports nothing else of act_jax."""
