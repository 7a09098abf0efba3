"""Block-sparse spacetime attention against the dense masked oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infstar_jax.training.packing import ExampleSpec, pack
from infstar_jax.transformer.attention import BlockLayout, block_sparse_attention, dot_product_attention

pytestmark = pytest.mark.transformer


def dense_oracle(q, k, v, mask, key_valid):
    """Plain masked softmax attention on the full L x L mask (the reference's FlexAttention semantics)."""
    b, l, h, d = q.shape
    g = h // k.shape[2]
    kk = jnp.repeat(k, g, axis=2)
    vv = jnp.repeat(v, g, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, kk) * d**-0.5
    m = jnp.asarray(mask)[None, None] & key_valid[:, None, None, :]
    s = jnp.where(m, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(m.any(-1, keepdims=True), p, 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", p, vv)


def packed_layout(seed):
    """A hidden-style packing: several examples (image + multi-clip video), text slots with padding."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(rng.integers(2, 4)):
        n = int(rng.integers(2, 4))
        image = [(1, 1 + i, 2 + i) for i in range(n)]
        clips = int(rng.integers(0, 3))
        sched = image + [(2 + 2 * (c == clips - 1), 1 + i, 2 + i) for c in range(clips) for i in range(n)]
        text_len = int(rng.integers(2, 9))
        examples.append(ExampleSpec(tuple(sched), n, (2,) * len(sched), tuple(range(len(sched))), text_len,
                                    text_len + int(rng.integers(0, 4)), 6))
    return pack(examples, pad_to_multiple=32)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("small", [4, 512])
def test_block_sparse_equals_dense_oracle(seed, small, monkeypatch):
    monkeypatch.setattr("infstar_jax.transformer.attention.SMALL_GROUP_TOKENS", small)
    packing = packed_layout(seed)
    layout = packing.layout
    l = layout.length
    key = jax.random.key(seed)
    kq, kk, kv = jax.random.split(key, 3)
    b, h, hkv, d = 2, 4, 2, 16
    q = jax.random.normal(kq, (b, l, h, d))
    k = jax.random.normal(kk, (b, l, hkv, d))
    v = jax.random.normal(kv, (b, l, hkv, d))
    valid = jnp.broadcast_to(jnp.asarray(packing.key_valid()), (b, l))

    def sparse(q, k, v):
        return block_sparse_attention(q, k, v, layout, key_valid=valid)

    def dense(q, k, v):
        return dense_oracle(q, k, v, layout.dense_mask(), valid)

    np.testing.assert_allclose(jax.jit(sparse)(q, k, v), jax.jit(dense)(q, k, v), atol=2e-6)
    ct = jax.random.normal(jax.random.key(99), q.shape)
    gs = jax.grad(lambda *a: jnp.sum(sparse(*a) * ct), argnums=(0, 1, 2))(q, k, v)
    gd = jax.grad(lambda *a: jnp.sum(dense(*a) * ct), argnums=(0, 1, 2))(q, k, v)
    for a, e in zip(gs, gd):
        np.testing.assert_allclose(a, e, atol=5e-6)


def test_layout_calls_cover_every_query_once_and_skip_padding():
    packing = packed_layout(7)
    layout = packing.layout
    covered = [i for c in layout.calls() for i in c.q_blocks]
    assert sorted(covered) == [i for i, s in enumerate(layout.sees) if s]
    assert len(covered) == len(set(covered))
    # Each call's keys are exactly the union of what its query blocks see: no block outside it is read.
    for c in layout.calls():
        assert set(c.k_blocks) == {j for i in c.q_blocks for j in layout.sees[i]}


def test_large_blocks_are_unmasked_calls():
    lengths = (600, 700, 5, 40)
    sees = ((0, 3), (0, 1, 3), (2, 3), (3,))
    calls = BlockLayout(lengths, sees).calls(small=512)
    big = [c for c in calls if c.q_blocks in ((0,), (1,))]
    assert len(big) == 2 and all(c.mask is None for c in big)


def test_gqa_head_mapping():
    """Query head h uses kv head h // (H / Hkv), as the reference's repeat_kv."""
    key = jax.random.key(0)
    q = jax.random.normal(key, (1, 5, 6, 8))
    k = jax.random.normal(jax.random.key(1), (1, 7, 2, 8))
    v = jax.random.normal(jax.random.key(2), (1, 7, 2, 8))
    out = dot_product_attention(q, k, v)
    for h in range(6):
        ref = jax.nn.softmax(q[0, :, h] @ k[0, :, h // 3].T * 8**-0.5) @ v[0, :, h // 3]
        np.testing.assert_allclose(out[0, :, h], ref, atol=1e-6)


def test_layout_refuses_unknown_blocks():
    with pytest.raises(ValueError, match="sees unknown blocks"):
        BlockLayout((3, 4), ((0, 2), (1,)))
