"""Golden parity of the transformer's training forward/backward with the PyTorch reference (B_transformer)."""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from goldens import case_params, load_case
from infstar_jax import checkpoint
from infstar_jax.convert.transformer import convert_transformer, key_table, layer_keys
from infstar_jax.convert.common import open_source
from infstar_jax.training.packing import ExampleSpec, pack
from infstar_jax.transformer import loss as loss_lib
from infstar_jax.transformer import rope
from infstar_jax.transformer.config import TransformerConfig
from infstar_jax.transformer.model import Transformer

pytestmark = [pytest.mark.golden, pytest.mark.transformer, pytest.mark.torch]
CASES = case_params("B_transformer")


def config_from_meta(meta) -> TransformerConfig:
    a = meta["arch"]
    return TransformerConfig(
        depth=a["depth"],
        embed_dim=a["embed_dim"],
        num_heads=a["num_heads"],
        num_kv_heads=a["num_key_value_heads"],
        head_dim=a["head_dim"],
        mlp_dim=a["mlp_intermediate"],
        qkvo_bias=a["qkvo_bias"],
        text_dim=a["text_channels"],
        text_maxlen=a["cfg_uncond_rows"],
        latent_dim=a["d_vae"],
        detail_bits=a["detail_head_out"] // 2,
        semantic_bits=a["semantic_head_out"] // 2,
        rope_base=a["rope"]["base"],
        norm_eps=a["rms_norm_eps"],
    )


def packing_from_meta(meta):
    examples = []
    for ex in meta["examples"]:
        examples.append(
            ExampleSpec(
                schedule=tuple(tuple(s) for s in ex["schedule"]),
                scales_per_clip=ex["scales_per_clip"],
                reps=tuple(s["repetitions"] for s in ex["scales"]),
                kept=tuple(s["si"] for s in ex["scales"]),
                text_len=ex["text_len"],
                text_slot=ex["text_len"],
                detail_scale_min_tokens=meta["train_args"]["detail_scale_min_tokens"],
            )
        )
    packing = pack(examples, pad_to_multiple=meta["arch"]["pad_to_multiplier"],
                   reweight_k=meta["train_args"]["reweight_loss_by_scale"],
                   max_reweight=meta["train_args"]["max_reweight_value"])
    repeat_idx = [[s["select_repeat_idx"] for s in ex["scales"]] for ex in meta["examples"]]
    return packing, repeat_idx


def checkpoint_sources(case_dir: Path):
    out = []
    for name in ("gpt.pth", "global_step_1.pth", "gpt_torch_shard"):
        if (case_dir / name).exists():
            out.append(case_dir / name)
    return out


@functools.lru_cache(maxsize=None)
def _converted(case_dir: Path, src_name: str, tmp_root: str):
    out = Path(tmp_root) / f"{case_dir.name}-{src_name}"
    convert_transformer(case_dir / src_name, out, overwrite=True)
    return checkpoint.load_params(out, kind="transformer")


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("converted"))


def inputs_from_case(meta, arrays, packing, repeat_idx):
    lens = [int(x) for x in arrays["text_lens"]]
    drop = [bool(x) for x in arrays["cond_drop"]]
    rows = np.concatenate([np.arange(n) if d else np.full(n, -1) for n, d in zip(lens, drop)]).astype(np.int32)
    return dict(
        visual=jnp.asarray(arrays["x_BLC"]),
        text=jnp.asarray(arrays["text_kv_compact"])[None],
        positions=jnp.asarray(packing.positions(repeat_idx))[None],
        uncond_rows=jnp.asarray(rows)[None],
    )


def labels_from_case(arrays, packing, bits):
    rows = []
    for j, b in enumerate(packing.visual):
        g = arrays[f"gt_{j:03d}"].astype(np.int32)
        rows.append(np.pad(g, ((0, 0), (0, bits - g.shape[1]))))
    return jnp.asarray(np.concatenate(rows))[None]


def close(actual, expected, atol, rtol=1e-5, what=""):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=atol, rtol=rtol, err_msg=what)


@pytest.mark.parametrize("case_dir", CASES)
def test_structure_positions_and_rope(case_dir):
    meta, arrays = load_case(case_dir)
    packing, repeat_idx = packing_from_meta(meta)
    np.testing.assert_array_equal(packing.layout.lengths, arrays["block_lengths"])
    np.testing.assert_array_equal(packing.layout.table(), arrays["block_table"])
    np.testing.assert_array_equal(packing.layout.dense_mask(), arrays["attn_mask_dense"])
    np.testing.assert_array_equal(packing.layout.block_ids(), arrays["doc_id"])
    for ours, ref in zip(packing.visual, meta["packing"]["visual_blocks"]):
        assert (ours.example, ours.si, list(ours.shape), ours.offset) == (
            ref["example"], ref["si"], ref["shape"], ref["offset"])
        assert ours.detail == (ref["head"] == "detail")
    np.testing.assert_allclose(packing.block_weights(), arrays["scale_weight"], rtol=1e-6)
    pos = packing.positions(repeat_idx)
    np.testing.assert_array_equal(pos, arrays["rope_pos"])
    cfg = config_from_meta(meta)
    np.testing.assert_array_equal(rope.inv_freq(cfg.head_dim, cfg.rope_base), arrays["rope_inv_freq"])
    cos, sin = rope.cos_sin(jnp.asarray(pos), cfg.head_dim, cfg.rope_base)
    close(cos, arrays["rope_cos_sin"][0], atol=1e-7, rtol=0, what="rope cos")
    close(sin, arrays["rope_cos_sin"][1], atol=1e-7, rtol=0, what="rope sin")


@pytest.mark.parametrize("case_dir", CASES)
def test_checkpoint_formats_convert_identically(case_dir, tmp_root):
    meta, _ = load_case(case_dir)
    sources = checkpoint_sources(Path(case_dir))
    assert sources, f"no checkpoint in {case_dir}"
    cfg = config_from_meta(meta)
    ref = None
    for src in sources:
        params = _converted(Path(case_dir), src.name, tmp_root)
        shapes = jax.tree.map(np.shape, params)
        assert shapes["blocks"]["attn"]["q_proj"]["kernel"] == (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.head_dim)
        if ref is None:
            ref = params
        else:
            jax.tree.map(np.testing.assert_array_equal, params, ref)


def _forward_and_grads(case_dir, tmp_root):
    meta, arrays = load_case(case_dir)
    cfg = config_from_meta(meta)
    packing, repeat_idx = packing_from_meta(meta)
    src = checkpoint_sources(Path(case_dir))[0]
    params = jax.tree.map(jnp.asarray, _converted(Path(case_dir), src.name, tmp_root))
    model = Transformer(cfg)
    inp = inputs_from_case(meta, arrays, packing, repeat_idx)
    labels = labels_from_case(arrays, packing, cfg.detail_bits)
    is_detail = jnp.asarray(packing.token_is_detail())
    token_block = jnp.asarray(packing.token_block())
    weights = jnp.asarray(packing.block_weights())

    def loss_fn(p):
        (detail, semantic), inter = model.apply(
            {"params": p}, inp["visual"], inp["text"], inp["positions"], packing.layout,
            uncond_rows=inp["uncond_rows"], mutable=["intermediates"])
        tl, ta = loss_lib.token_loss_acc(detail, semantic, labels, is_detail)
        total, per_scale = loss_lib.scale_weighted(tl, token_block, weights)
        acc_total, per_scale_acc = loss_lib.scale_weighted(ta, token_block, weights)
        aux = dict(detail=detail, semantic=semantic, token_loss=tl, token_acc=ta, scale_loss=per_scale,
                   scale_acc=per_scale_acc, final_acc=acc_total, inter=inter["intermediates"])
        return total[0], aux

    (total, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    return meta, arrays, cfg, packing, total, aux, grads


@pytest.mark.parametrize("case_dir", CASES)
def test_forward_matches_reference(case_dir, tmp_root):
    meta, arrays, cfg, packing, total, aux, _ = _forward_and_grads(case_dir, tmp_root)
    inter = aux["inter"]
    blk = inter["blocks"]
    b, lv = 1, packing.visual_len
    close(inter["h0"][0], arrays["h0"], atol=1e-5, what="h0")
    close(aux["detail"].reshape(b, lv, -1), arrays["logits_detail"], atol=1e-4, what="logits_detail")
    close(aux["semantic"].reshape(b, lv, -1), arrays["logits_semantic"], atol=1e-4, what="logits_semantic")
    for i in range(cfg.depth):
        close(blk["block_out"][0][i], arrays[f"block_out_{i:02d}"], atol=1e-4, what=f"block {i}")
    attn = blk["attn"]
    # block 0 internals: golden q/k are [B, heads, L, hd]; ours [B, L, heads, hd]
    for name in ("q_prerope", "k_prerope", "q_rope", "k_rope"):
        close(np.swapaxes(attn[name][0][0], 1, 2), arrays[f"b0_{name}"], atol=1e-5, what=name)
    close(attn["v"][0][0].reshape(b, packing.length, -1), arrays["b0_v"], atol=1e-5, what="v")
    close(attn["attn_out"][0][0], arrays["b0_attn_out"], atol=1e-5, what="attn_out")
    close(inter["final_norm_out"][0], arrays["final_norm_out"], atol=1e-4, what="final_norm_out")
    close(aux["token_loss"][0], arrays["loss_per_token"], atol=1e-5, what="loss_per_token")
    np.testing.assert_array_equal(np.asarray(aux["token_acc"][0]), arrays["acc_per_token"])
    close(aux["scale_loss"][0], arrays["scale_loss"], atol=1e-5, what="scale_loss")
    close(aux["scale_acc"][0], arrays["scale_acc"], atol=1e-6, what="scale_acc")
    close(total, arrays["final_loss"], atol=1e-5, what="final_loss")
    close(aux["final_acc"][0], arrays["final_acc"], atol=1e-6, what="final_acc")


@pytest.mark.parametrize("case_dir", CASES)
def test_gradients_match_reference(case_dir, tmp_root):
    meta, arrays, cfg, packing, total, aux, grads = _forward_and_grads(case_dir, tmp_root)
    src = open_source(checkpoint_sources(Path(case_dir))[0], (("trainer", "gpt_fsdp"), ()))
    layers, _ = layer_keys(src)
    table = key_table(cfg, layers)
    checked = 0
    for key in meta["grad_params"]:
        rule = next(r for r in table.rules if key in r.keys)
        expected = rule.transform(arrays[f"grad.{key}"])
        ours = grads
        for k in rule.path:
            ours = ours[k]
        ours = np.asarray(ours)
        if rule.stacked:
            ours = ours[rule.keys.index(key)]
        scale = np.abs(expected).max()
        np.testing.assert_allclose(ours, expected, atol=1e-4 * scale, rtol=0, err_msg=f"grad {key}")
        checked += 1
    assert checked == len(meta["grad_params"]) > 0
