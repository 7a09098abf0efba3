"""Chunked causal execution of the video VAE equals whole-sequence execution (SPEC §4.5), and the causal conv equals an
independent PyTorch oracle. Random tiny VAEs; every jitted function is compiled once per shape."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infstar_jax.tokenizer.layers import CausalConv3d
from infstar_jax.tokenizer.vae import (
    ChunkedVAE,
    VAEConfig,
    VideoVAE,
    decoded_frames,
    decoder_chunks,
    encoder_chunks,
    init_params,
)

pytestmark = pytest.mark.tokenizer

# Two DC blocks, both compressing time: the chunk/cache logic of the released 4-block VAE at a fraction of the compile time.
CFG = VAEConfig(block_out_channels=(8, 16, 16), layers_per_block=1, spatial_compression_list=(2, 2))
LATENT_ATOL, PIXEL_ATOL = 1e-5, 1e-4


@functools.lru_cache(maxsize=None)
def _model():
    model = VideoVAE(CFG)
    return model, init_params(model, seed=3)


@functools.lru_cache(maxsize=None)
def _whole_encode():
    """Whole-sequence ``(encoder output, VideoVAE.encode latent)`` in one jit."""
    model, _ = _model()

    def fn(v, x, k):
        enc, _ = model.apply(v, x, method=VideoVAE.encode_features)
        return enc, model.apply(v, x, key=k, method=VideoVAE.encode)

    return jax.jit(fn)


@functools.lru_cache(maxsize=None)
def _whole_decode():
    model, _ = _model()
    return jax.jit(lambda v, z: model.apply(v, z, method=VideoVAE.decode))


def _video(t, h=16, w=24, seed=0):
    return jax.random.uniform(jax.random.key(seed), (1, t, h, w, 3), jnp.float32, -1.0, 1.0)


def _latent(t, h=2, w=3, seed=1):
    return jax.random.normal(jax.random.key(seed), (1, t, h, w, CFG.embed_dim), jnp.float32)


def test_chunk_plans():
    # The reference's plans (wan_bsq_vae.py _encode/_decode with 8 frames / 2 latent frames per chunk).
    assert encoder_chunks(1, 8) == [(0, 1)]
    assert encoder_chunks(17, 8) == [(0, 9), (9, 17)]
    assert encoder_chunks(81, 8) == [(0, 9)] + [(9 + 8 * i, 17 + 8 * i) for i in range(9)]
    assert encoder_chunks(5, 8) == [(0, 5)]
    assert decoder_chunks(1, 2) == [(0, 1, False)]
    assert decoder_chunks(5, 2) == [(0, 3, False), (3, 5, False)]
    assert decoder_chunks(4, 2) == [(0, 4, True)]
    assert decoder_chunks(6, 2) == [(0, 4, True), (4, 6, False)]
    assert decoder_chunks(2, 2) == [(0, 2, True)]  # the reference raises here; this is whole-sequence decoding
    assert decoder_chunks(21, 4) == [(0, 5, False)] + [(5 + 4 * i, 9 + 4 * i, False) for i in range(4)]
    assert decoder_chunks(6, 4) == [(0, 6, True)]
    # Frame bookkeeping agrees with the plans: 4k+1 latent frames -> 16k+1 output frames, whatever the chunking.
    for t in (1, 2, 4, 5, 6, 9, 21):
        for per in (2, 4):
            total = sum(decoded_frames(e - s, (2, 2), sf) for s, e, sf in decoder_chunks(t, per))
            assert total == 1 + 4 * (t - 1), (t, per)
    with pytest.raises(ValueError, match="latent_frames_per_chunk"):
        ChunkedVAE(_model()[0], latent_frames_per_chunk=3)
    with pytest.raises(ValueError, match="frames_per_chunk"):
        ChunkedVAE(_model()[0], frames_per_chunk=6)


def test_encode_long_video_chunked_equals_whole():
    model, v = _model()
    x = _video(33)  # encoder chunks [0,9) [9,17) [17,25) [25,33) -> 9 latent frames
    runner = ChunkedVAE(model)
    key = jax.random.key(7)
    enc_c = runner.encode_features(v, x)
    enc_w, lat_w = _whole_encode()(v, x, key)
    assert enc_c.shape == (1, 9, 4, 6, 2 * CFG.latent_channels)
    np.testing.assert_allclose(np.asarray(enc_c), np.asarray(enc_w), rtol=0, atol=LATENT_ATOL)
    lat_c = runner.encode(v, x, key=key)
    assert lat_c.shape == (1, 9, 2, 3, CFG.embed_dim)
    np.testing.assert_allclose(np.asarray(lat_c), np.asarray(lat_w), rtol=0, atol=LATENT_ATOL)
    # Chunking must not be invisible by accident: the latent depends on the key and on late frames.
    assert np.abs(np.asarray(runner.encode(v, x, key=jax.random.key(8)) - lat_c)).max() > 1e-3
    x2 = x.at[:, 30].set(0.0)
    enc2 = runner.encode_features(v, x2)
    assert np.abs(np.asarray(enc2[:, :8] - enc_c[:, :8])).max() == 0.0  # causal: frame 30 feeds latent frame 8 only
    assert np.abs(np.asarray(enc2[:, 8] - enc_c[:, 8])).max() > 1e-4


@pytest.mark.parametrize("t_lat", [9, 6, 2])
def test_decode_chunked_equals_whole(t_lat):
    model, v = _model()
    z = _latent(t_lat)
    out_c = ChunkedVAE(model).decode(v, z)
    out_w = _whole_decode()(v, z)
    assert out_c.shape == (1, 1 + 4 * (t_lat - 1), 16, 24, 3)
    np.testing.assert_allclose(np.asarray(out_c), np.asarray(out_w), rtol=0, atol=PIXEL_ATOL)


def test_decode_longer_chunks_equal_reference_chunks():
    model, v = _model()
    z = _latent(9)
    ref = ChunkedVAE(model).decode(v, z)
    out = ChunkedVAE(model, latent_frames_per_chunk=4).decode(v, z)  # [0,5) [5,9)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=PIXEL_ATOL)
    frames = ChunkedVAE(model).decode(v, z, frames=True)
    assert frames.dtype == jnp.uint8 and frames.shape == ref.shape
    ref_u8 = np.array((jnp.clip((ref + 1) / 2, 0, 1) * 255).astype(jnp.uint8))
    ref_u8[:, 0] = ref_u8[:, 1]
    np.testing.assert_array_equal(np.asarray(frames), ref_u8)


def test_bf16_compute_close_to_fp32():
    model, v = _model()
    z = _latent(5)
    ref = _whole_decode()(v, z)
    m16 = VideoVAE(CFG, dtype=jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda v, z: m16.apply(v, z, method=VideoVAE.decode))(v, z)
    convs = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert convs and all(e.invars[0].aval.dtype == jnp.bfloat16 for e in convs)
    out = jax.jit(lambda v, z: m16.apply(v, z, method=VideoVAE.decode))(v, z)
    assert out.dtype == jnp.float32
    err = np.abs(np.asarray(out) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max()
    assert 0 < err < 0.05, err


@pytest.mark.torch
def test_causal_conv_matches_torch_oracle_and_caches():
    import torch

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 5, 6, 3)).astype(np.float32)
    conv = CausalConv3d(4)
    v = nn.meta.unbox(conv.init(jax.random.key(0), jnp.asarray(x)))
    apply = jax.jit(conv.apply)
    y, cache = apply(v, jnp.asarray(x))
    # Oracle: replicate frame 0 twice in front, zero-pad space by 1, valid conv3d, in torch NCDHW / OIDHW.
    xt = torch.from_numpy(np.moveaxis(x, -1, 1))
    xt = torch.cat([xt[:, :, :1]] * 2 + [xt], dim=2)
    xt = torch.nn.functional.pad(xt, (1, 1, 1, 1))
    w = torch.from_numpy(np.transpose(np.asarray(v["params"]["kernel"]), (4, 3, 0, 1, 2)).copy())
    ref = torch.nn.functional.conv3d(xt, w, torch.from_numpy(np.array(v["params"]["bias"])))
    np.testing.assert_allclose(np.asarray(y), np.moveaxis(ref.numpy(), 1, -1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache), x[:, -2:])
    # Two chunks with the carried cache equal one pass; a 1-frame chunk works too.
    y1, c1 = apply(v, jnp.asarray(x[:, :3]))
    y2, c2 = apply(v, jnp.asarray(x[:, 3:6]), c1)
    y3, _ = apply(v, jnp.asarray(x[:, 6:]), c2)
    np.testing.assert_allclose(np.concatenate([y1, y2, y3], axis=1), np.asarray(y), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="cache"):
        apply(v, jnp.asarray(x[:, :, :4]), c1)
