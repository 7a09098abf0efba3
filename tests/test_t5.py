"""The Flax T5 encoder against transformers' PyTorch ``T5EncoderModel``, end to end through the converter.

Every config is generated from a seed (heads, d_kv != d_model / heads, bucket counts, max distances, gated and plain
feed-forwards, activations, layer counts, sequence lengths longer than max_distance, padding masks), so the
comparison is a property of the implementation, not of one shape.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infstar_jax.parallel import DEFAULT_RULES, make_mesh
from infstar_jax.text import load_text_encoder
from infstar_jax.text.t5 import T5Config, abstract_params, relative_position_buckets

# Every test builds its checkpoints with PyTorch transformers.
pytestmark = [pytest.mark.text, pytest.mark.torch]

FFN_KINDS = ["gated-gelu", "relu", "gated-silu", "gelu", "gated-relu"]
SEEDS = range(5)  # one per feed-forward kind


def random_hf_config(seed: int) -> dict:
    """A small random transformers T5 config; the feed-forward kind cycles with the seed."""
    r = np.random.default_rng(seed)
    buckets = int(r.integers(4, 65))
    return {
        "vocab_size": int(r.integers(64, 200)),
        "d_model": int(r.choice([16, 24, 32, 40])),
        "num_heads": int(r.integers(1, 5)),
        "d_kv": int(r.integers(3, 17)),
        "d_ff": int(r.integers(8, 80)),
        "num_layers": int(r.integers(1, 5)),
        "relative_attention_num_buckets": buckets,
        "relative_attention_max_distance": int(r.integers(buckets // 4 + 1, 120)),
        "feed_forward_proj": FFN_KINDS[seed % len(FFN_KINDS)],
        "layer_norm_epsilon": float(r.choice([1e-6, 1e-5])),
    }


def build_torch_encoder(hf_config: dict, seed: int):
    """transformers T5EncoderModel with every weight random (layer norms too, which init to ones)."""
    import torch
    from transformers import T5Config as HFConfig, T5EncoderModel

    torch.manual_seed(seed)
    model = T5EncoderModel(HFConfig(**hf_config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def run_cli(argv) -> int:
    """``python -m infstar_jax.convert ...`` in-process; returns the exit status."""
    from infstar_jax.convert.__main__ import main

    return main(list(argv))


def torch_forward(model, ids, mask) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    return out.last_hidden_state.numpy()


def random_batch(r: np.random.Generator, vocab: int, batch: int, length: int):
    ids = r.integers(0, vocab, (batch, length)).astype(np.int32)
    lengths = r.integers(1, length + 1, batch)
    lengths[0] = length  # one unpadded row
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    return ids, mask


def assert_close_relative(got, want, tol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= tol, f"max |diff| / max |ref| = {err:.3g} > {tol}"


def test_random_configs_cover_the_variants():
    cfgs = [T5Config.from_hf(random_hf_config(s)) for s in SEEDS]
    assert {c.is_gated_act for c in cfgs} == {True, False}
    assert {"gelu_new", "relu"} <= {c.dense_act_fn for c in cfgs}
    assert any(c.d_kv * c.num_heads != c.d_model for c in cfgs)
    assert any(c.num_heads > 1 for c in cfgs) and any(c.num_layers > 1 for c in cfgs)
    assert len({(c.relative_attention_num_buckets, c.relative_attention_max_distance) for c in cfgs}) == len(cfgs)


def test_relative_position_buckets_match_transformers():
    import torch
    from transformers.models.t5.modeling_t5 import T5Attention

    def ref(rel, nb, md):
        return T5Attention._relative_position_bucket(torch.as_tensor(rel), True, nb, md).numpy()

    # Flan-T5 (32, 128) over the full 512 x 512 table: distances 16/32/64 sit exactly on bucket edges.
    rel = np.arange(512)[None, :] - np.arange(512)[:, None]
    np.testing.assert_array_equal(relative_position_buckets(512, 512, 32, 128), ref(rel, 32, 128))
    # Any config: the table depends only on key - query, so one row (offsets 0..n-1) and one column (-(n-1)..0)
    # cover every offset.
    # (20, 160) and (78, 608) have edge distances where an fp64 formula picks the neighbouring bucket.
    n = 1200
    configs = [(nb, md) for nb in (4, 5, 7, 8, 16, 31, 33, 64, 100) for md in sorted({nb // 4 + 1, 20, 128, 999})]
    for nb, md in configs + [(20, 160), (78, 608)]:
        if md <= nb // 4:
            continue
        row = relative_position_buckets(1, n, nb, md)[0]
        col = relative_position_buckets(n, 1, nb, md)[:, 0]
        np.testing.assert_array_equal(row, ref(np.arange(n), nb, md), err_msg=f"buckets={nb} max_distance={md}")
        np.testing.assert_array_equal(col, ref(-np.arange(n), nb, md), err_msg=f"buckets={nb} max_distance={md}")
    assert relative_position_buckets(3, 5, 32, 128).shape == (3, 5)


@pytest.mark.parametrize("seed", SEEDS)
def test_matches_transformers_t5_encoder(seed, tmp_path):
    hf_config = random_hf_config(seed)
    model = build_torch_encoder(hf_config, seed)
    model.save_pretrained(tmp_path / "hf")
    assert run_cli(["t5", "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "jax")]) == 0
    enc = load_text_encoder(tmp_path / "jax")
    assert enc.config == T5Config.from_hf(hf_config)

    r = np.random.default_rng(seed)
    md = hf_config["relative_attention_max_distance"]
    for length in (int(r.integers(1, 12)), int(min(2 * md + 3, 150))):  # the second reaches past max_distance
        ids, mask = random_batch(r, hf_config["vocab_size"], 3, length)
        want = torch_forward(model, ids, mask)
        got = enc.encode_ids(ids, mask)
        assert got.dtype == jnp.float32
        assert_close_relative(got, want, 1e-5)  # every row, padded positions included


# --- one Flan-like tiny model with a tokenizer, shared by the remaining tests ----------------------------------

TINY = {
    "vocab_size": 96, "d_model": 32, "num_heads": 4, "d_kv": 8, "d_ff": 64, "num_layers": 2,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu",
}
PROMPTS = [
    "<<<t=5s>>>a cat runs over the lazy dog, Close-up on big objects, emphasize scale and detail",
    "the quick brown fox",
    "",
    "ocean waves at night. red light. blue sky.",
    "a",
    "mountain city camera slowly",
    "big big big objects " * 3,
    "green",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A converted tiny gated-GELU T5 with a sentencepiece tokenizer trained on the fly (+ the torch model)."""
    from test_text_tokenizer import train_spiece

    root = tmp_path_factory.mktemp("tiny_t5")
    model = build_torch_encoder(TINY, seed=123)
    model.save_pretrained(root / "hf")
    sp = train_spiece(root / "hf")
    assert sp.get_piece_size() <= TINY["vocab_size"]
    assert run_cli(["t5", "--src", str(root / "hf"), "--out", str(root / "jax")]) == 0
    return root / "jax", model


def test_encode_prompts_matches_release_padding(tiny_dir):
    """encode() (bucketed) keeps exactly the rows the release keeps from a max_length=512 padded forward."""
    folder, model = tiny_dir
    enc = load_text_encoder(folder)
    feats, lengths = enc.encode(PROMPTS)
    ids512, mask512 = enc.tokenizer(PROMPTS)  # padding='max_length' (512), as run_infinity.py
    assert ids512.shape == (len(PROMPTS), 512)
    np.testing.assert_array_equal(lengths, mask512.sum(1))
    assert lengths.dtype == np.int32 and feats.shape[1] == min(b for b in enc.buckets if b >= lengths.max())
    assert feats.shape[1] < 512 and feats.dtype == jnp.float32
    want = torch_forward(model, ids512, mask512)
    feats = np.asarray(feats)
    for b, n in enumerate(lengths):
        assert_close_relative(feats[b, :n], want[b, :n], 1e-5)
        assert not feats[b, n:].any()  # rows past the prompt are zeroed


def test_bf16_close_to_fp32(tiny_dir):
    folder, _ = tiny_dir
    rng = np.random.default_rng(0)
    ids, mask = random_batch(rng, TINY["vocab_size"], 4, 40)
    f32 = np.asarray(load_text_encoder(folder).encode_ids(ids, mask))
    bf16_enc = load_text_encoder(folder, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(bf16_enc.params)} == {jnp.dtype(jnp.bfloat16)}
    bf16 = np.asarray(bf16_enc.encode_ids(ids, mask))
    assert bf16.dtype == np.float32
    err = np.abs(bf16 - f32).max() / np.abs(f32).max()
    assert 0 < err < 3e-2, err  # bf16 really ran (err > 0) and stays close
    # Mixed: fp32 storage, bf16 matmuls.
    mixed = np.asarray(load_text_encoder(folder, dtype=jnp.bfloat16, param_dtype=jnp.float32).encode_ids(ids, mask))
    assert np.abs(mixed - f32).max() / np.abs(f32).max() < 3e-2


@pytest.mark.sharding
@pytest.mark.parametrize(
    "shape, n_prompts",
    [({"data": 8}, 8), ({"data": 2, "fsdp": 2, "tensor": 2}, 8), ({"data": 4, "tensor": 2}, 5)],  # 5: batch padding
)
def test_sharded_encode_matches_single_device(tiny_dir, shape, n_prompts):
    folder, _ = tiny_dir
    prompts = PROMPTS[:n_prompts]
    want, want_len = load_text_encoder(folder).encode(prompts)
    mesh = make_mesh(shape)
    enc = load_text_encoder(folder, mesh=mesh)
    got, got_len = enc.encode(prompts)
    np.testing.assert_array_equal(got_len, want_len)
    assert_close_relative(got, want, 1e-5)
    # The work really is split: the batch over (data, fsdp), the heads / MLP over tensor.
    assert enc.batch_multiple() == shape.get("data", 1) * shape.get("fsdp", 1)
    q = enc.params["layers"]["q"]  # [layers, embed, heads, head_dim]
    fsdp, tensor = shape.get("fsdp", 1), shape.get("tensor", 1)
    n, d, h, k = q.shape
    assert q.sharding.shard_shape(q.shape) == (n, d // fsdp, h // tensor, k)
    ids, mask = enc.tokenizer(PROMPTS, buckets=enc.buckets)
    out = enc.encode_ids(ids, mask)
    assert len(out.sharding.device_set) == 8 and out.sharding.shard_shape(out.shape)[0] < len(PROMPTS)


def test_params_carry_logical_axes():
    cfg = T5Config.from_hf(TINY)
    boxed = abstract_params(cfg)
    known = {name for name, _ in DEFAULT_RULES}
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: hasattr(x, "names"))
    assert leaves and all(hasattr(x, "names") for x in leaves)
    for leaf in leaves:
        assert len(leaf.names) == len(leaf.value.shape)
        assert set(leaf.names) - {None} <= known, leaf.names
    layers = boxed["layers"]
    assert all(x.names[0] == "layers" and x.value.shape[0] == cfg.num_layers for x in jax.tree.leaves(
        layers, is_leaf=lambda x: hasattr(x, "names")))
    assert layers["q"].names == ("layers", "embed", "heads", "head_dim")
    assert boxed["token_embedding"].names == ("vocab", "embed")


@pytest.mark.parametrize("proj", ["relu", "gelu", "gated-gelu", "gated-silu", "gated-relu", "silu"])
def test_config_from_hf_matches_transformers(proj):
    from transformers import T5Config as HFConfig

    hf = HFConfig(feed_forward_proj=proj)
    ours = T5Config.from_hf({"feed_forward_proj": proj})  # everything else: transformers' defaults
    assert (ours.dense_act_fn, ours.is_gated_act) == (hf.dense_act_fn, hf.is_gated_act)
    for f in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
              "relative_attention_max_distance", "layer_norm_epsilon"):
        assert getattr(ours, f) == getattr(hf, f), f
    assert T5Config.from_dict(json.loads(json.dumps(ours.to_dict()))) == ours


def test_config_errors():
    with pytest.raises(ValueError, match="'gated-ACT'"):
        T5Config.from_hf({"feed_forward_proj": "fancy-gelu"})
    with pytest.raises(ValueError, match="dense_act_fn 'mish'"):
        T5Config.from_hf({"feed_forward_proj": "mish"})
    with pytest.raises(ValueError, match="relative_attention_num_buckets=2"):
        T5Config.from_hf({"relative_attention_num_buckets": 2})
    with pytest.raises(ValueError, match="unknown T5Config fields"):
        T5Config.from_dict({"d_model": 4, "bogus": 1})


def test_user_errors(tiny_dir, tmp_path):
    folder, _ = tiny_dir
    enc = load_text_encoder(folder)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 96\)"):
        enc.encode_ids(np.full((1, 3), 96), np.ones((1, 3)))
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        enc.encode_ids(np.zeros((1, 3)), np.ones((1, 4)))
    with pytest.raises(ValueError, match="non-empty list of strings"):
        enc.encode("just a string")
    with pytest.raises(ValueError, match="dtype must be float32 or bfloat16"):
        load_text_encoder(folder, dtype=jnp.float16)
    with pytest.raises(FileNotFoundError, match="not an infstar-jax checkpoint"):
        load_text_encoder(tmp_path)
    # A converted directory without tokenizer files encodes ids but says why it cannot encode text.
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("spiece.model", "tokenizer*"))
    enc = load_text_encoder(bare)
    assert enc.tokenizer is None
    with pytest.raises(ValueError, match="no tokenizer"):
        enc.encode(["x"])
