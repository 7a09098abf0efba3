"""Transformer module properties: logical axis names, remat policies, precision modes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import subjaxprs

from infstar_jax.training.packing import ExampleSpec, pack
from infstar_jax.transformer import loss as loss_lib
from infstar_jax.transformer.config import PRECISION_MODES, REMAT_POLICIES, TransformerConfig
from infstar_jax.transformer.model import Transformer, init_params

pytestmark = pytest.mark.transformer

CFG = TransformerConfig(depth=2, embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128, text_dim=24,
                        text_maxlen=16)


def inputs(seed=0):
    ex = ExampleSpec(((1, 1, 1), (1, 2, 2), (2, 1, 1), (2, 2, 2)), 2, (2,) * 4, (0, 1, 2, 3), 5, 5, 3)
    packing = pack([ex], pad_to_multiple=8)
    rng = np.random.default_rng(seed)
    return packing, dict(
        visual=jnp.asarray(rng.normal(size=(1, packing.visual_len, 64)), jnp.float32),
        text=jnp.asarray(rng.normal(size=(1, 5, CFG.text_dim)), jnp.float32),
        positions=jnp.asarray(packing.positions([[0, 1, 0, 1]]))[None],
        labels=jnp.asarray(rng.integers(0, 2, size=(1, packing.visual_len, 64))),
    )


def loss_of(cfg, params, packing, x):
    d, s = Transformer(cfg).apply({"params": params}, x["visual"], x["text"], x["positions"], packing.layout)
    tl, _ = loss_lib.token_loss_acc(d, s, x["labels"], jnp.asarray(packing.token_is_detail()))
    return loss_lib.scale_weighted(tl, jnp.asarray(packing.token_block()), jnp.asarray(packing.block_weights()))[0][0]


def test_every_param_has_logical_axis_names():
    boxed = jax.eval_shape(lambda: init_params(CFG, jax.random.key(0))["params"])
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    for leaf in leaves:
        assert len(leaf.names) == len(leaf.value.shape)
    specs = nn.get_partition_spec(boxed)
    assert tuple(specs["blocks"]["attn"]["q_proj"]["kernel"]) == ("layers", "embed", "heads", "head_dim")
    assert tuple(specs["blocks"]["mlp"]["down_proj"]["kernel"]) == ("layers", "mlp", "embed")


@pytest.mark.parametrize("policy", [p if p == "full" else pytest.param(p, marks=pytest.mark.slow)
                                    for p in REMAT_POLICIES if p != "none"])
def test_remat_policies_give_identical_gradients(policy):
    packing, x = inputs()
    params = nn.unbox(init_params(CFG, jax.random.key(1))["params"])
    g0 = jax.jit(jax.grad(lambda p: loss_of(CFG, p, packing, x)))(params)
    cfg = CFG.replace(remat=policy)
    g1 = jax.jit(jax.grad(lambda p: loss_of(cfg, p, packing, x)))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), g1, g0)


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_precision_modes(mode):
    """bf16 modes keep the reference's dtypes (fp32 heads/embeddings params, bf16 blocks in infer) and stay close."""
    packing, x = inputs()
    params = nn.unbox(init_params(CFG, jax.random.key(2))["params"])
    cfg = CFG.with_precision(mode)
    assert cfg.dtype == "bfloat16" and cfg.residual_dtype == PRECISION_MODES[mode]["residual_dtype"]
    boxed = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))["params"])
    unboxed = nn.unbox(boxed)
    assert unboxed["blocks"]["mlp"]["up_proj"]["kernel"].dtype == jnp.dtype(PRECISION_MODES[mode]["block_param_dtype"])
    assert unboxed["head"]["kernel"].dtype == jnp.float32 and unboxed["word_embed"]["kernel"].dtype == jnp.float32
    cast = dict(params, blocks=jax.tree.map(lambda a: a.astype(cfg.jnp_block_param_dtype), params["blocks"]))
    d32, _ = Transformer(CFG).apply({"params": params}, x["visual"], x["text"], x["positions"], packing.layout)
    d16, _ = Transformer(cfg).apply({"params": cast}, x["visual"], x["text"], x["positions"], packing.layout)
    assert d16.dtype == jnp.float32  # heads are fp32 in every mode
    err = np.abs(np.asarray(d16) - np.asarray(d32)).max() / np.abs(np.asarray(d32)).max()
    assert 0 < err < 0.05


def _eqns(jaxpr):
    """Every equation of ``jaxpr`` and of its sub-jaxprs, recursively."""
    yield from jaxpr.eqns
    for sub in subjaxprs(jaxpr):
        yield from _eqns(sub)


def test_mixed_precision_casts_block_kernels_once_outside_the_layer_loop():
    """train precision: the layer scan receives bf16 kernels (one cast of the stacked weights, none per layer), and
    the gradients are those of running on the pre-cast kernels, converted to fp32 once (the per-layer cast gave the
    same values: a cast's gradient is a convert wherever it sits)."""
    packing, x = inputs()
    cfg = CFG.with_precision("train").replace(remat="full")
    params = nn.unbox(init_params(cfg, jax.random.key(3))["params"])
    loss = lambda p: loss_of(cfg, p, packing, x)  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.grad(loss))(params).jaxpr

    up = params["blocks"]["mlp"]["up_proj"]["kernel"]
    scans = [e for e in _eqns(jaxpr) if e.primitive.name == "scan"]
    operands = [v.aval for e in scans for v in e.invars if hasattr(v, "aval")]
    assert any(a.shape == up.shape and a.dtype == jnp.bfloat16 for a in operands)
    assert not any(a.shape == up.shape and a.dtype == jnp.float32 for a in operands)
    g = jax.jit(jax.grad(loss))(params)
    is_kernel = lambda path, _: getattr(path[-1], "key", None) == "kernel"  # noqa: E731
    pre = jax.tree_util.tree_map_with_path(lambda pth, a: a.astype(jnp.bfloat16) if is_kernel(pth, a) else a,
                                           params["blocks"])
    g_pre = jax.jit(jax.grad(lambda b: loss(dict(params, blocks=b))))(pre)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g["blocks"])[0], jax.tree.leaves(g_pre)):
        assert a.dtype == jnp.float32, path
        b = np.asarray(b.astype(jnp.float32))  # equal up to fp32 summation order
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6 * np.abs(b).max(), err_msg=str(path))


def test_attention_policies_keep_the_attention_kernels_forward():
    """``attn_out`` / ``dots_attn`` must spare the backward pass a second attention forward (the old ``attn_out``
    saved nothing and still passed the gradient test above): with the splash kernel (interpreted on CPU, a
    ``pallas_call`` as on TPU) the backward of ``full`` re-runs the forward kernel, theirs do not. The cuDNN
    primitive the policies also name must exist under that name in this JAX."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    from infstar_jax.transformer import splash
    from infstar_jax.transformer.model import ATTENTION_PRIMITIVES, _remat_policy

    assert cudnn_attention._dot_product_attention_fwd_p_wrapper.name in ATTENTION_PRIMITIVES
    kq, kk = jax.random.split(jax.random.key(0))
    q = jax.random.normal(kq, (1, 128, 2, 128))
    kv = jax.random.normal(kk, (1, 256, 1, 128))

    def calls(policy):
        f = jax.checkpoint(lambda q, k: jnp.sum(splash.attention(q, k, k, max_block=128, interpret=True) ** 2),
                           policy=_remat_policy(policy))
        jaxpr = jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(q, kv).jaxpr
        return sum(e.primitive.name == "pallas_call" for e in _eqns(jaxpr))

    full = calls("full")
    assert calls("attn_out") == full - 1 and calls("dots_attn") == full - 1


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_rope_rounding_matches_the_reference_order(dtype):
    """SPEC §1.6: ``a <- bf16(bf16(a*cos) - f32(b*sin))``, ``b <- bf16(bf16(b*cos) + f32(a*sin))`` on interleaved pairs,
    computed here op by op in numpy (no fused multiply-add) from the tables ``rope.cos_sin`` gives."""
    import ml_dtypes

    from infstar_jax.transformer import rope

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 9, 3, 32)) * 4, dtype)
    pos = jnp.asarray(rng.integers(0, 600, size=(2, 9, 4)))
    cos, sin = rope.cos_sin(pos, 32)
    got = np.asarray(rope.apply(x, cos, sin).astype(jnp.float32))

    np_dt = ml_dtypes.bfloat16 if dtype == jnp.bfloat16 else np.float32
    pairs = np.asarray(x.astype(jnp.float32)).reshape(2, 9, 3, 16, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    c, s = np.asarray(cos)[:, :, None], np.asarray(sin)[:, :, None]
    tmp1, tmp2 = (b * s).astype(np.float32), (a * s).astype(np.float32)
    a_new = ((a * c).astype(np_dt).astype(np.float32) - tmp1).astype(np_dt).astype(np.float32)
    b_new = ((b * c).astype(np_dt).astype(np.float32) + tmp2).astype(np_dt).astype(np.float32)
    want = np.stack([a_new, b_new], axis=-1).reshape(got.shape)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_qkv_block_equals_separate_projections(bias):
    """``fuse_qkv`` (the sampler's per-layer layout): one matmul over the joined Q/K/V kernels gives the block's
    output and K/V of the three separate projections, with or without biases."""
    from infstar_jax.transformer.model import FUSED_QKV, Block, fuse_qkv
    from infstar_jax.transformer import rope

    cfg = CFG.replace(qkvo_bias=bias)
    blocks = nn.meta.unbox(init_params(cfg, jax.random.key(1))["params"])["blocks"]
    layer = jax.tree.map(lambda x: x[0], blocks)
    if bias:  # non-zero biases, so that their placement in the fused vector matters
        layer = jax.tree_util.tree_map_with_path(
            lambda p, x: x + 0.1 * (1 + jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)) / x.size
            if p[-1].key == "bias" else x, layer)
    fused = fuse_qkv(layer)
    assert FUSED_QKV in fused["attn"] and "q_proj" not in fused["attn"]
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(2, 6, cfg.embed_dim)), jnp.float32)
    pos = jnp.asarray(rng.integers(0, 9, size=(2, 6, 4)))
    cos, sin = rope.cos_sin(pos, cfg.head_dim)
    pk = jnp.asarray(rng.normal(size=(2, 3, cfg.num_kv_heads, cfg.head_dim)), jnp.float32)
    prefix = (pk, pk * 0.5, jnp.ones((2, 3), bool))
    run = lambda p: Block(cfg).apply({"params": p}, h, cos, sin, None, None, prefix)  # noqa: E731
    (out_a, (k_a, v_a)), (out_b, (k_b, v_b)) = run(layer), run(fused)
    for a, b in ((out_a, out_b), (k_a, k_b), (v_a, v_b)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
