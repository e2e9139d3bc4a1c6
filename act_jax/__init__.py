"""act-jax: activation-guided channel-wise ability transfer (ACT) in JAX/Flax."""

__version__ = '0.1.0'
