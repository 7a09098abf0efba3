"""Forward and loss gradient on 8 simulated CPU devices equal the single-device ones."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from infstar_jax import parallel
from infstar_jax.training.packing import ExampleSpec, pack
from infstar_jax.transformer import loss as loss_lib
from infstar_jax.transformer.config import TransformerConfig
from infstar_jax.transformer.model import Transformer, init_params

pytestmark = [pytest.mark.transformer, pytest.mark.sharding]

CFG = TransformerConfig(depth=2, embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128, text_dim=24,
                        text_maxlen=16)


def batch(seed, b):
    ex = ExampleSpec(((1, 1, 1), (1, 2, 2), (1, 3, 3), (4, 1, 1), (4, 2, 2), (4, 3, 3)), 3, (2,) * 6,
                     tuple(range(6)), 5, 8, 4)
    packing = pack([ex, ex], pad_to_multiple=16)
    rng = np.random.default_rng(seed)
    lv, lt = packing.visual_len, sum(e.text_slot for e in packing.examples)
    reps = [[rng.integers(0, 2) for _ in range(6)] for _ in range(2)]
    data = dict(
        visual=rng.normal(size=(b, lv, CFG.latent_dim)).astype(np.float32),
        text=rng.normal(size=(b, lt, CFG.text_dim)).astype(np.float32),
        positions=np.broadcast_to(packing.positions(reps), (b, packing.length, 4)).copy(),
        uncond_rows=np.where(rng.random((b, lt)) < 0.3, np.tile(np.arange(lt) % 5, (b, 1)), -1).astype(np.int32),
        key_valid=np.broadcast_to(packing.key_valid(), (b, packing.length)).copy(),
        labels=rng.integers(0, 2, size=(b, lv, CFG.detail_bits)).astype(np.int32),
    )
    return packing, data


def loss_fn(params, data, packing):
    model = Transformer(CFG)
    detail, semantic = model.apply({"params": params}, data["visual"], data["text"], data["positions"],
                                   packing.layout, uncond_rows=data["uncond_rows"], key_valid=data["key_valid"])
    tl, _ = loss_lib.token_loss_acc(detail, semantic, data["labels"], jnp.asarray(packing.token_is_detail()))
    total, _ = loss_lib.scale_weighted(tl, jnp.asarray(packing.token_block()), jnp.asarray(packing.block_weights()))
    return total.mean(), (detail, semantic)


@pytest.mark.parametrize("mesh_shape", [dict(fsdp=4, tensor=2), dict(data=2, fsdp=2, tensor=2)],
                         ids=["fsdp4_tensor2", "data2_fsdp2_tensor2"])
def test_sharded_forward_and_grad_equal_single_device(mesh_shape):
    packing, data = batch(0, b=4)
    step = jax.value_and_grad(functools.partial(loss_fn, packing=packing), has_aux=True)
    single_params = nn.unbox(init_params(CFG, jax.random.key(1))["params"])
    (ref_loss, ref_logits), ref_grads = jax.jit(step)(single_params, data)

    mesh = parallel.make_mesh(mesh_shape)
    with jax.set_mesh(mesh):
        params, shardings = parallel.init_sharded(lambda r: init_params(CFG, r)["params"], jax.random.key(1),
                                                  mesh=mesh)
        # Born sharded: the q projection is split over fsdp (embed) and tensor (heads).
        assert params["blocks"]["attn"]["q_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor", None)
        data_sh = jax.tree.map(lambda x: NamedSharding(mesh, P(("data", "fsdp"))), data)
        sharded_step = jax.jit(step, in_shardings=(shardings, data_sh), out_shardings=None)
        (loss, logits), grads = sharded_step(params, jax.device_put(data, data_sh))

    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for a, e in zip(logits, ref_logits):
        np.testing.assert_allclose(a, e, atol=2e-5)
    flat_ref = dict(jax.tree_util.tree_flatten_with_path(ref_grads)[0])
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        e = flat_ref[path]
        np.testing.assert_allclose(g, e, atol=1e-5 * max(1e-6, float(np.abs(e).max())) + 1e-9,
                                   err_msg=jax.tree_util.keystr(path))
