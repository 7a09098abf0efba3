"""The splash-attention kernel (Pallas interpret mode on CPU) against the dense masked oracle, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infstar_jax import parallel
from infstar_jax.training.packing import ExampleSpec, pack
from infstar_jax.transformer import splash
from infstar_jax.transformer.attention import BlockLayout, block_sparse_attention, dot_product_attention

pytestmark = pytest.mark.transformer

TOL = 1e-5


def dense_oracle(q, k, v, mask, key_valid):
    """Masked softmax attention over the full ``[Lq, Lk]`` mask; rows that see no valid key give 0."""
    d = q.shape[-1]
    g = q.shape[2] // k.shape[2]
    kk, vv = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, kk) * d**-0.5
    m = jnp.asarray(mask)[None, None] & key_valid[:, None, None, :]
    s = jnp.where(m, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(m.any(-1, keepdims=True), p, 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", p, vv)


def random_packing(seed: int):
    """A hidden-style packed sequence: 2-3 examples (image-only or 1-2 video clips), random kept scales (each clip's
    last scale kept when a later clip references it), text lengths and slots that are not multiples of 128."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(int(rng.integers(2, 4))):
        n = int(rng.integers(2, 5))
        hw = [(1 + i, 1 + i + int(rng.integers(0, 3))) for i in range(n)]
        clips = int(rng.integers(0, 3))
        sched = [(1, h, w) for h, w in hw] + [(int(rng.integers(2, 5)), h, w) for _ in range(clips) for h, w in hw]
        last_of_clip = {c * n + n - 1 for c in range(clips)}
        kept = [si for si in range(len(sched)) if si in last_of_clip or si >= len(sched) - n or rng.random() < 0.7]
        text_len = int(rng.integers(1, 40))
        examples.append(ExampleSpec(tuple(sched), n, (2,) * len(sched), tuple(sorted(set(kept))), text_len,
                                    text_len + int(rng.integers(0, 7)), 6))
    return pack(examples, pad_to_multiple=int(rng.choice([0, 16, 128])))


def qkv(seed, b, lq, lk, h=4, hkv=2, d=16):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (b, lq, h, d)), jax.random.normal(kk, (b, lk, hkv, d)),
            jax.random.normal(kv, (b, lk, hkv, d)))


def assert_fwd_and_grads(fn, oracle, q, k, v, seed=0):
    """Outputs and input gradients (of a random projection of the output) of ``fn`` equal the oracle's."""
    ct = jax.random.normal(jax.random.key(1000 + seed), jax.eval_shape(oracle, q, k, v).shape)

    def fwd_bwd(f):
        def run(q, k, v):
            out, pullback = jax.vjp(f, q, k, v)
            return out, pullback(ct)
        return jax.jit(run)(q, k, v)

    out, grads = fwd_bwd(fn)
    expected_out, expected = fwd_bwd(oracle)
    np.testing.assert_allclose(out, expected_out, atol=TOL, rtol=TOL)
    for name, a, e in zip("qkv", grads, expected):
        assert np.isfinite(np.asarray(a)).all(), name
        np.testing.assert_allclose(a, e, atol=TOL, rtol=TOL, err_msg=f"d{name}")


@pytest.mark.parametrize("seed", [1, 9])
def test_packed_layout_equals_dense_oracle(seed):
    packing = random_packing(seed)
    layout = packing.layout
    n = layout.length
    q, k, v = qkv(seed, 2, n, n)
    valid = jnp.broadcast_to(jnp.asarray(packing.key_valid()), (2, n))
    assert_fwd_and_grads(
        lambda q, k, v: splash.block_sparse_attention(q, k, v, layout, key_valid=valid, max_block=128, interpret=True),
        lambda q, k, v: dense_oracle(q, k, v, layout.dense_mask(), valid), q, k, v, seed)


def test_empty_rows_are_zero_with_finite_gradients():
    # Block 1 sees nothing; block 2 sees only block 3, whose keys are all invalid in row 0; block 4 sees only
    # itself, all invalid in row 1; padded to 256.
    layout = BlockLayout((70, 50, 40, 30, 10), ((0, 3), (), (3,), (3, 0), (4,)))
    q, k, v = qkv(5, 2, layout.length, layout.length)
    valid = np.ones((2, layout.length), bool)
    valid[0, 160:190] = False
    valid[1, 190:] = False
    valid = jnp.asarray(valid)
    fn = lambda q, k, v: splash.block_sparse_attention(q, k, v, layout, key_valid=valid, max_block=128,  # noqa: E731
                                                       interpret=True)
    out = np.asarray(fn(q, k, v))
    assert not out[:, 70:120].any() and not out[0, 120:160].any() and not out[1, 190:].any()
    assert np.abs(out[1, 120:160]).min() > 0
    assert_fwd_and_grads(fn, lambda q, k, v: dense_oracle(q, k, v, layout.dense_mask(), valid), q, k, v, 5)


def test_kernel_skips_exactly_the_empty_tiles():
    packing = random_packing(11)
    layout = packing.layout
    block = 128
    lp = splash.round_up(layout.length, block)
    kernel, _ = splash._layout_kernel(layout, lp, 1, block, True)
    # The kernel's grid walks, per query tile, the key tiles listed in data_next where block_mask > 0.
    info = kernel.fwd_mask_info
    live, next_kv = np.asarray(info.block_mask)[0] > 0, np.asarray(info.data_next)[0]
    visited = np.zeros((lp // block, lp // block), bool)
    for i, j in zip(*np.nonzero(live)):
        visited[i, next_kv[i, j]] = True
    mask = np.zeros((lp, lp), bool)
    mask[: layout.length, : layout.length] = layout.dense_mask()
    tiles = mask.reshape(lp // block, block, lp // block, block).any(axis=(1, 3))
    # Padding rows (and see-nothing blocks) look at their own group only: extra tiles on the diagonal at most.
    assert (visited >= tiles).all()
    assert (visited & ~tiles).sum() <= lp // block
    assert visited.sum() < visited.size, "a packed layout must leave some tiles empty"
    # The mask itself: the layout's table where a row sees something, the row's own block where it sees nothing.
    lazy = splash.LayoutMask(layout, lp)
    n = layout.length
    sees = ~lazy.empty_rows()[:n]
    assert not sees.all()
    np.testing.assert_array_equal(lazy[0:n, 0:n][sees], layout.dense_mask()[sees])
    own = layout.block_ids()[:, None] == layout.block_ids()[None, :]
    np.testing.assert_array_equal(lazy[0:n, 0:n][~sees], own[~sees])


@pytest.mark.parametrize("axes,expected", [
    (dict(data=2, fsdp=2, tensor=2), (("data", "fsdp"), "tensor")),
    # Sequence (context) shards each take a share of the heads: no device repeats another's attention.
    (dict(fsdp=2, context=2, tensor=2), (("data", "fsdp"), ("tensor", "context"))),
])
def test_sharded_kernel_equals_oracle(axes, expected):
    packing = random_packing(3)
    layout = packing.layout
    n = layout.length
    q, k, v = qkv(3, 4, n, n, h=8, hkv=4)
    valid = jnp.broadcast_to(jnp.asarray(packing.key_valid()), (4, n))
    mesh = parallel.make_mesh(axes)
    with jax.set_mesh(mesh):
        assert splash.shard_axes(4, 8, 4) == expected
        out = jax.jit(lambda q, k, v: splash.block_sparse_attention(q, k, v, layout, key_valid=valid,
                                                                     max_block=128, interpret=True))(q, k, v)
    np.testing.assert_allclose(out, dense_oracle(q, k, v, layout.dense_mask(), valid), atol=TOL, rtol=TOL)


@pytest.mark.parametrize("with_mask", [False, True])
def test_prefix_attention_equals_xla(with_mask):
    # The sampler's call: 150 current tokens against themselves + 233 cached keys, padded text keys per row.
    lq, lk = 150, 383
    q, k, v = qkv(7, 2, lq, lk)
    valid = jnp.asarray(np.arange(lk)[None, :] < np.array([[300], [383]]))
    mask = None
    if with_mask:
        mask = np.random.default_rng(0).random((lq, lk)) < 0.4
        mask[3] = False  # a row that sees nothing
    assert_fwd_and_grads(
        lambda q, k, v: splash.attention(q, k, v, mask=mask, key_valid=valid, max_block=128, interpret=True),
        lambda q, k, v: dot_product_attention(q, k, v, mask=mask, key_valid=valid, implementation="xla"),
        q, k, v, 7)


def test_dispatcher_routes_splash_and_keeps_cpu_default():
    packing = random_packing(6)
    layout = packing.layout
    q, k, v = qkv(4, 1, layout.length, layout.length)
    valid = jnp.asarray(packing.key_valid())[None]
    xla = jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, layout, key_valid=valid))(q, k, v)
    kernel = jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, layout, key_valid=valid,
                                                            implementation="splash"))(q, k, v)
    np.testing.assert_allclose(kernel, xla, atol=TOL, rtol=TOL)
    # On CPU the automatic choice is the existing per-block path (the same jaxpr as asking for "xla").
    auto = jax.make_jaxpr(lambda q: block_sparse_attention(q, k, v, layout, key_valid=valid))(q)
    explicit = jax.make_jaxpr(lambda q: block_sparse_attention(q, k, v, layout, key_valid=valid,
                                                               implementation="xla"))(q)
    assert str(auto) == str(explicit)
    assert "pallas_call" not in str(auto)


def test_refuses_mismatched_lengths_and_heads():
    layout = BlockLayout((10, 6), ((0, 1), (1,)))
    q, k, v = qkv(0, 1, 16, 16, h=3, hkv=2)
    with pytest.raises(ValueError, match="query heads"):
        splash.block_sparse_attention(q, k, v, layout, interpret=True)
    q, k, v = qkv(0, 1, 17, 17)
    with pytest.raises(ValueError, match="layout length"):
        splash.block_sparse_attention(q, k, v, layout, interpret=True)
    with pytest.raises(ValueError, match="multiple of 128"):
        splash.block_size_for(100, max_block=200)
