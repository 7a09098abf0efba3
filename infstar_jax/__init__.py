"""infstar-jax: InfinityStar in JAX/Flax."""
