"""The Mosaic GPU flash attention (the sampler's kernel on Hopper), run in Mosaic GPU interpret mode on CPU: its
pipeline (producer/consumer barriers, two-warpgroup turns), key parts read in place, partial key blocks and per-row
masking against an fp32 oracle. The interpreter models TMA's zero fill of reads past an array's end but not the
clipping of a partial query tile's write, so query lengths here are whole tiles; the partial tile, the real
``wgmma``/``run_state`` path and speed are checked on the GPU (benchmarks/bench_attention.py reports the error of the
first and last queries against fp32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infstar_jax.transformer import attention, flash_mgpu

pytestmark = pytest.mark.sampling


def _interpret():
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    # TMA reads past the end of an array return zeros on the GPU; the interpreter's "zero" fill models that.
    return InterpretGPUParams(out_of_bounds_reads="uninitialized", uninitialized_memory="zero")


def _oracle(q, k, v, valid):
    g = q.shape[2] // k.shape[2]
    kk, vv = (jnp.repeat(x.astype(jnp.float32), g, axis=2) for x in (k, v))
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kk, precision="highest") * q.shape[-1] ** -0.5
    s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), vv, precision="highest")


def _inputs(seed, b, lq, lp, h=2, hkv=1, d=64, dtype=jnp.bfloat16):
    rng = np.random.default_rng(seed)

    def f(*shape):
        return jnp.asarray(rng.normal(size=shape), dtype)

    return f(b, lq, h, d), f(b, lq, hkv, d), f(b, lq, hkv, d), f(b, lp, hkv, d), f(b, lp, hkv, d)


@pytest.mark.parametrize("tiling", ["64/128/2", pytest.param("64/64/3", marks=pytest.mark.slow)])
def test_prefix_attention_kernel_matches_fp32(monkeypatch, tiling):
    """Current tokens (a partial last key block) and a cached prefix whose text padding differs per row."""
    monkeypatch.setenv("INFSTAR_FLASH_TILING", tiling)
    q, k, v, pk, pv = _inputs(0, 2, 128, 152)
    prefix_valid = jnp.asarray(np.arange(152)[None] < np.array([[150], [97]]))
    o = attention.prefix_attention(q, k, v, pk, pv, prefix_valid, maskable_tail=64, implementation="mosaic",
                                   interpret=_interpret())
    assert o.shape == q.shape and o.dtype == q.dtype
    valid = jnp.concatenate([jnp.ones((2, 128), bool), prefix_valid], axis=1)
    ref = _oracle(q, jnp.concatenate([k, pk], 1), jnp.concatenate([v, pv], 1), valid)
    err = float(jnp.max(jnp.abs(o.astype(jnp.float32) - ref)))
    assert err < 2e-2, err  # bf16 output and probabilities
    # The second row's padded text keys carry weight if the mask is dropped: the oracle without it differs.
    unmasked = _oracle(q, jnp.concatenate([k, pk], 1), jnp.concatenate([v, pv], 1), jnp.ones_like(valid))
    assert float(jnp.max(jnp.abs(unmasked[1] - ref[1]))) > 10 * err


@pytest.mark.slow
def test_kernel_static_lengths_and_fp16():
    """Static valid lengths, a length not a multiple of the key block, fp16 tiles."""
    q, k, v, pk, pv = _inputs(1, 1, 128, 40, dtype=jnp.float16)
    o = flash_mgpu.flash_attention(q, [k, pk], [v, pv], [100, 33], tiling=flash_mgpu.Tiling(64, 64, 2),
                                   interpret=_interpret())
    valid = jnp.asarray(np.concatenate([np.arange(128) < 100, np.arange(40) < 33]))[None]
    ref = _oracle(q, jnp.concatenate([k, pk], 1), jnp.concatenate([v, pv], 1), valid)
    assert float(jnp.max(jnp.abs(o.astype(jnp.float32) - ref))) < 5e-3


def test_prefix_attention_routes_agree_off_gpu():
    """Off Hopper the auto route is the dispatcher over the concatenated keys, as before the kernel."""
    q, k, v, pk, pv = _inputs(2, 2, 24, 16, dtype=jnp.float32)
    prefix_valid = jnp.asarray(np.arange(16)[None] < np.array([[16], [9]]))
    o = attention.prefix_attention(q, k, v, pk, pv, prefix_valid, maskable_tail=16)
    valid = jnp.concatenate([jnp.ones((2, 24), bool), prefix_valid], axis=1)
    ref = _oracle(q, jnp.concatenate([k, pk], 1), jnp.concatenate([v, pv], 1), valid)
    np.testing.assert_allclose(np.asarray(o), np.asarray(ref), atol=1e-5)


def test_kernel_rejects_bad_inputs():
    q, k, v, pk, pv = _inputs(3, 1, 128, 40)
    with pytest.raises(ValueError, match="multiple of 8"):
        flash_mgpu.flash_attention(q, [k, pk[:, :37]], [v, pv[:, :37]])
    with pytest.raises(ValueError, match="valid keys"):
        flash_mgpu.flash_attention(q, [k, pk], [v, pv], [200, None])
    with pytest.raises(ValueError, match="block_q/block_kv/stages"):
        flash_mgpu.Tiling.parse("64x128")
    with pytest.raises(ValueError, match="per-row lengths"):
        flash_mgpu.flash_attention(q, [k], [v], [jnp.array([3, 4])])


def test_kernel_only_in_single_device_programs(monkeypatch):
    """The kernel cannot be partitioned by XLA: under a multi-device mesh the sampler keeps cuDNN."""
    from jax.sharding import AxisType

    monkeypatch.setattr(attention, "_target_platform", lambda: "gpu")
    monkeypatch.setattr(attention, "_hopper", lambda: True)
    q = jnp.zeros((8, 16, 2, 64), jnp.bfloat16)
    seen = {}

    def probe(x):
        seen["ok"] = attention._mosaic_ok(x)
        return x

    jax.jit(probe)(q)
    assert seen["ok"]
    mesh = jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh):
        jax.jit(probe)(q)
    assert not seen["ok"]


@pytest.mark.gpu
def test_kernel_on_hopper_matches_fp32():
    """The compiled kernel (``JAX_PLATFORMS=cuda pytest -m gpu`` on an H100/H200): rows with different text padding,
    a partial last query tile and key block, both default tilings."""
    if not flash_mgpu.available():
        pytest.fail("needs a Hopper GPU as the default backend (run with JAX_PLATFORMS=cuda)")
    for lq in (1000, 40_000):  # blocks of 128 and of 192 keys
        q, k, v, pk, pv = _inputs(4, 2, lq, 1700, h=32, hkv=8, d=128)
        prefix_valid = jnp.asarray(np.arange(1700)[None] < np.array([[1700], [1613]]))
        o = jax.jit(lambda *a: attention.prefix_attention(*a, maskable_tail=512, implementation="mosaic"))(
            q, k, v, pk, pv, prefix_valid)
        rows = np.r_[0:64, lq - 72:lq]
        valid = jnp.concatenate([jnp.ones((2, lq), bool), prefix_valid], axis=1)
        ref = _oracle(q[:, rows], jnp.concatenate([k, pk], 1), jnp.concatenate([v, pv], 1), valid)
        assert float(jnp.max(jnp.abs(o[:, rows].astype(jnp.float32) - ref))) < 2e-3
