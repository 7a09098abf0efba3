"""The VAE with activations split over 8 simulated CPU devices (batch over ``data``, rows over ``context``) gives the
single-device results: chunked encode/decode (caches sharded too) and a whole-sequence decode jitted with explicit
in/out shardings under ``jax.set_mesh``."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from infstar_jax.parallel import make_mesh, param_shardings
from infstar_jax.tokenizer.vae import ChunkedVAE, VAEConfig, VideoVAE, abstract_variables, activation_sharding, init_params

pytestmark = [pytest.mark.tokenizer, pytest.mark.sharding]

CFG = VAEConfig(block_out_channels=(8, 16, 16), layers_per_block=1, spatial_compression_list=(2, 2))
ROWS = P(("data", "fsdp"), None, "context", None, None)


@functools.lru_cache(maxsize=None)
def _setup():
    assert jax.device_count() == 8, "tests/conftest.py should give 8 simulated CPU devices"
    model = VideoVAE(CFG)
    variables = init_params(model, seed=5)
    mesh = make_mesh({"data": 2, "context": 4})
    # Batch 2 over data=2; 32 rows -> 16 -> 8 (encoder output) -> 4 (latent): every level splits over context=4.
    pixels = jax.random.uniform(jax.random.key(0), (2, 17, 32, 16, 3), jnp.float32, -1.0, 1.0)
    latent = jax.random.normal(jax.random.key(1), (2, 5, 4, 2, CFG.embed_dim), jnp.float32)
    return model, variables, mesh, pixels, latent


def test_chunked_encode_decode_sharded_equals_single_device():
    model, v, mesh, pixels, latent = _setup()
    eps = jax.random.normal(jax.random.key(2), (2, 5, 4, 2, CFG.embed_dim), jnp.float32)
    single = ChunkedVAE(model)
    lat_ref = np.asarray(single.encode(v, pixels, eps=eps))
    dec_ref = np.asarray(single.decode(v, latent))
    with jax.set_mesh(mesh):
        sharded = ChunkedVAE(model, mesh=mesh)
        lat = sharded.encode(v, pixels, eps=eps)
        dec = sharded.decode(v, latent)
        enc = sharded.encode_features(v, pixels)
    assert enc.sharding.is_equivalent_to(NamedSharding(mesh, ROWS), 5), enc.sharding
    assert dec.sharding.is_equivalent_to(NamedSharding(mesh, ROWS), 5), dec.sharding
    assert len({d for s in dec.addressable_shards for d in [s.device]}) == 8
    np.testing.assert_allclose(np.asarray(lat), lat_ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dec), dec_ref, rtol=0, atol=1e-4)


def test_whole_sequence_decode_jit_with_shardings():
    model, v, mesh, _, latent = _setup()
    fn = lambda v, z: model.apply(v, z, method=VideoVAE.decode)  # noqa: E731
    ref = np.asarray(jax.jit(fn)(v, latent))
    with jax.set_mesh(mesh):
        params_sh = param_shardings(abstract_variables(model), mesh)
        z_sh = activation_sharding(mesh, latent.shape)
        out_sh = activation_sharding(mesh, ref.shape)
        assert z_sh.spec == ROWS and out_sh.spec == ROWS
        v_sharded = jax.device_put(v, params_sh)
        z_sharded = jax.device_put(latent, z_sh)
        out = jax.jit(fn, in_shardings=(params_sh, z_sh), out_shardings=out_sh)(v_sharded, z_sharded)
    assert out.sharding.is_equivalent_to(out_sh, 5)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=1e-4)


def test_activation_sharding_drops_axes_that_do_not_divide():
    mesh = _setup()[2]
    assert activation_sharding(mesh, (2, 5, 4, 2, 64)).spec == ROWS
    assert activation_sharding(mesh, (1, 5, 6, 2, 64)).spec == P(None, None, None, None, None)
    assert activation_sharding(mesh, (4, 5, 2, 2, 64)).spec == P(("data", "fsdp"), None, None, None, None)
