"""PyTorch checkpoints -> infstar-jax param trees -> orbax (``python -m infstar_jax.convert {transformer,vae,t5}``)."""
