import time
import jax, jax.numpy as jnp
jax.config.update("jax_explain_cache_misses", True)
from infstar_jax.transformer.attention import cached_attention, prepare_sampling_attention
g = jax.jit(lambda x: x * 2)
prepare_sampling_attention()
g(jnp.ones(3))
q = jax.random.normal(jax.random.key(0), (2, 4608, 32, 128), jnp.bfloat16)
k = jax.random.normal(jax.random.key(1), (2, 4708, 8, 128), jnp.bfloat16)
valid = jnp.ones(k.shape[:2], bool)
f = jax.jit(lambda q, k, v, m: cached_attention(q, k, v, m, "mosaic"))
for i in range(3):
    t0 = time.perf_counter()
    jax.block_until_ready(f(q, k, k, valid))
    print(f"=== call {i}: {time.perf_counter() - t0:.3f} s", flush=True)
t0 = time.perf_counter(); g(jnp.ones(3)); print(f"=== g again {time.perf_counter() - t0:.4f} s")
