"""``python -m infstar_jax.convert t5``: every source layout, the Flan-T5-XL key manifest, strict refusals."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from infstar_jax.checkpoint import read_meta
from infstar_jax.text import load_text_encoder
from infstar_jax.text.t5 import T5Config

from goldens import GOLDEN_DIR
from test_t5 import assert_close_relative, build_torch_encoder, random_batch, run_cli, torch_forward
from test_text_tokenizer import train_spiece, write_tokenizer_json

pytestmark = [pytest.mark.text, pytest.mark.torch]

MANIFEST = GOLDEN_DIR / "D_manifests" / "manifest_flan_t5_xl_encoder.json"
SMALL = {
    "vocab_size": 80, "d_model": 24, "num_heads": 3, "d_kv": 5, "d_ff": 40, "num_layers": 2,
    "relative_attention_num_buckets": 12, "relative_attention_max_distance": 30, "feed_forward_proj": "gated-gelu",
}


def write_folder(folder: Path, hf_config: dict, tensors: dict, layout: str) -> Path:
    """A Hugging Face folder: config.json + ``tensors`` in ``layout`` (bin, bin-sharded, st, st-sharded)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "t5", **hf_config}))
    seen, unshared = set(), {}
    for k, v in tensors.items():  # safetensors refuses tied tensors: store each alias as its own copy
        ptr = v.untyped_storage().data_ptr()
        unshared[k] = v.detach().clone() if ptr in seen else v.detach().contiguous()
        seen.add(ptr)
    tensors = unshared
    keys = list(tensors)
    halves = {"a": keys[: len(keys) // 2], "b": keys[len(keys) // 2:]}
    if layout == "bin":
        torch.save(tensors, folder / "pytorch_model.bin")
    elif layout == "st":
        save_file(tensors, folder / "model.safetensors")
    elif layout in ("bin-sharded", "st-sharded"):
        ext = "bin" if layout == "bin-sharded" else "safetensors"
        weight_map = {}
        for tag, part in halves.items():
            name = f"part-{tag}.{ext}"
            shard = {k: tensors[k] for k in part}
            torch.save(shard, folder / name) if ext == "bin" else save_file(shard, folder / name)
            weight_map.update({k: name for k in part})
        index = "pytorch_model.bin.index.json" if ext == "bin" else "model.safetensors.index.json"
        (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        raise ValueError(layout)
    return folder


def convert(src: Path, out: Path, *extra) -> int:
    return run_cli(["t5", "--src", str(src), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def small():
    """The torch encoder and its state dict (which holds both shared.weight and its alias)."""
    model = build_torch_encoder(SMALL, seed=7)
    return model, dict(model.state_dict())


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    """The four tokenizer files of a Hugging Face T5 folder (tokenizer built on the fly)."""
    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer_json(folder, train_spiece(folder), model_max_length=64)
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}))
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("layout", ["bin", "bin-sharded", "st", "st-sharded"])
def test_every_layout_converts_to_the_same_encoder(small, tokenizer_files, layout, tmp_path):
    model, sd = small
    src = write_folder(tmp_path / "hf", SMALL, sd, layout)
    assert sorted(tokenizer_files) == ["special_tokens_map.json", "spiece.model", "tokenizer.json",
                                       "tokenizer_config.json"]
    for name, data in tokenizer_files.items():
        (src / name).write_bytes(data)
    assert convert(src, tmp_path / "out") == 0
    out = tmp_path / "out"
    meta = read_meta(out)
    assert meta["kind"] == "t5" and T5Config.from_dict(meta["config"]) == T5Config.from_hf(SMALL)
    for name, data in tokenizer_files.items():  # the converted folder is self-contained
        assert (out / name).read_bytes() == data
    enc = load_text_encoder(out)
    assert enc.tokenizer.max_length == 64 and enc.buckets[-1] == 64
    ids, mask = random_batch(np.random.default_rng(0), SMALL["vocab_size"], 3, 45)
    assert_close_relative(enc.encode_ids(ids, mask), torch_forward(model, ids, mask), 1e-5)


def test_full_t5_checkpoint_converts_its_encoder(tmp_path):
    """A T5ForConditionalGeneration state dict: decoder, lm_head and the embedding aliases are skipped."""
    import torch
    from transformers import T5Config as HFConfig, T5ForConditionalGeneration

    torch.manual_seed(3)
    full = T5ForConditionalGeneration(HFConfig(**SMALL, num_decoder_layers=1, tie_word_embeddings=False)).eval()
    sd = full.state_dict()
    assert {"decoder.embed_tokens.weight", "lm_head.weight", "encoder.embed_tokens.weight"} <= set(sd)
    src = write_folder(tmp_path / "hf", SMALL, sd, "st")
    assert convert(src, tmp_path / "out") == 0
    enc = load_text_encoder(tmp_path / "out")
    ids, mask = random_batch(np.random.default_rng(1), SMALL["vocab_size"], 2, 20)
    with torch.no_grad():
        want = full.get_encoder()(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask))
    assert_close_relative(enc.encode_ids(ids, mask), want.last_hidden_state.numpy(), 1e-5)


def test_embedding_under_its_alias_only(small, tmp_path):
    model, sd = small
    sd = {k: v for k, v in sd.items() if k != "shared.weight"}
    src = write_folder(tmp_path / "hf", SMALL, sd, "st")
    assert convert(src, tmp_path / "out") == 0
    enc = load_text_encoder(tmp_path / "out")
    np.testing.assert_array_equal(enc.params["token_embedding"], model.shared.weight.detach().numpy())


# --- refusals ----------------------------------------------------------------------------------------------------


def _refused(capsys, src, out, *needles):
    assert convert(src, out) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    assert not out.exists()
    return err


def test_refuses_missing_key(small, tmp_path, capsys):
    key = "encoder.block.1.layer.0.SelfAttention.k.weight"
    sd = {k: v for k, v in small[1].items() if k != key}
    src = write_folder(tmp_path / "hf", SMALL, sd, "st-sharded")
    _refused(capsys, src, tmp_path / "out", "missing key", repr(key))


def test_refuses_unexpected_keys(small, tmp_path, capsys):
    import torch

    sd = dict(small[1])
    extra = "encoder.block.0.layer.0.SelfAttention.extra.weight"
    relpos1 = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"  # only layer 0 has one
    sd[extra] = torch.zeros(3)
    sd[relpos1] = torch.zeros(12, 3)
    src = write_folder(tmp_path / "hf", SMALL, sd, "bin")
    _refused(capsys, src, tmp_path / "out", "unexpected key", repr(extra), repr(relpos1))


def test_refuses_misshaped_key(small, tmp_path, capsys):
    import torch

    key = "encoder.block.0.layer.1.DenseReluDense.wo.weight"
    sd = dict(small[1])
    sd[key] = torch.zeros(24, 41)
    src = write_folder(tmp_path / "hf", SMALL, sd, "bin-sharded")
    _refused(capsys, src, tmp_path / "out", repr(key), "(24, 41)", "expected (24, 40)")


def test_refuses_config_mismatch_and_bad_folders(small, tmp_path, capsys):
    # The weights are for gated-gelu; a config saying relu expects `wi` and has no use for wi_0 / wi_1.
    src = write_folder(tmp_path / "relu", {**SMALL, "feed_forward_proj": "relu"}, small[1], "st")
    _refused(capsys, src, tmp_path / "out", "'encoder.block.0.layer.1.DenseReluDense.wi.weight'",
             "unexpected key 'encoder.block.0.layer.1.DenseReluDense.wi_0.weight'")
    bare = tmp_path / "bare"
    bare.mkdir()
    _refused(capsys, bare, tmp_path / "out", "has no config.json")
    (bare / "config.json").write_text(json.dumps(SMALL))
    _refused(capsys, bare, tmp_path / "out", "holds no weights")
    (bare / "config.json").write_text(json.dumps({**SMALL, "model_type": "bert"}))
    _refused(capsys, bare, tmp_path / "out", "model_type is 'bert'")
    _refused(capsys, tmp_path / "nowhere", tmp_path / "out", "is not a folder")


def test_command_line_exit_status(small, tmp_path):
    """The real ``python -m infstar_jax.convert t5`` process: status 2 and the key named on a refusal, 0 on success."""
    key = "encoder.final_layer_norm.weight"
    sd = {k: v for k, v in small[1].items() if k != key}
    bad = write_folder(tmp_path / "bad", SMALL, sd, "st")
    good = write_folder(tmp_path / "good", SMALL, small[1], "st")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "infstar_jax.convert", "t5", "--src"]
    proc = subprocess.run(cmd + [str(bad), "--out", str(tmp_path / "o1")], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and repr(key) in proc.stderr and "missing key" in proc.stderr, proc.stderr
    proc = subprocess.run(cmd + [str(good), "--out", str(tmp_path / "o2")], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert read_meta(tmp_path / "o2")["kind"] == "t5"


def test_existing_output_needs_overwrite(small, tmp_path, capsys):
    src = write_folder(tmp_path / "hf", SMALL, small[1], "st")
    out = tmp_path / "out"
    out.mkdir()
    assert convert(src, out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert convert(src, out, "--overwrite") == 0
    assert read_meta(out)["kind"] == "t5"


# --- the released Flan-T5-XL key manifest -------------------------------------------------------------------------


def manifest_param_shapes(manifest: dict, num_layers: int) -> dict:
    """The param shapes the manifest implies for our layout (written independently of the converter's table)."""
    cfg = manifest["config"]
    h, dkv = cfg["num_heads"], cfg["d_kv"]
    per_layer = {
        "layer.0.layer_norm.weight": ("attention_norm", lambda s: s),
        "layer.0.SelfAttention.q.weight": ("q", lambda s: (s[1], h, dkv)),
        "layer.0.SelfAttention.k.weight": ("k", lambda s: (s[1], h, dkv)),
        "layer.0.SelfAttention.v.weight": ("v", lambda s: (s[1], h, dkv)),
        "layer.0.SelfAttention.o.weight": ("o", lambda s: (h, dkv, s[0])),
        "layer.1.layer_norm.weight": ("mlp_norm", lambda s: s),
        "layer.1.DenseReluDense.wi_0.weight": ("wi_0", lambda s: s[::-1]),
        "layer.1.DenseReluDense.wi_1.weight": ("wi_1", lambda s: s[::-1]),
        "layer.1.DenseReluDense.wo.weight": ("wo", lambda s: s[::-1]),
    }
    shapes = {}
    for entry in manifest["keys"]:
        key, shape = entry["key"], tuple(entry["shape"])
        if key == "shared.weight":
            shapes["token_embedding"] = shape
        elif key == "encoder.final_layer_norm.weight":
            shapes["final_norm"] = shape
        elif key.endswith("relative_attention_bias.weight"):
            assert key.startswith("encoder.block.0.")
            shapes["relative_attention_bias"] = shape
        elif key.startswith("encoder.block."):
            layer, rest = key[len("encoder.block."):].split(".", 1)
            name, fn = per_layer[rest]
            if int(layer) == 0:
                shapes[f"layers/{name}"] = (num_layers,) + tuple(fn(shape))
        else:
            assert key == "encoder.embed_tokens.weight", key  # the tied alias
    return shapes


def test_flan_t5_xl_manifest_converts(tmp_path):
    """A checkpoint with the released key names and shapes (2 of the 24 layers, zeros, bf16 to halve the bytes)
    written as safetensors shards with an index converts to the param shapes the manifest implies."""
    import orbax.checkpoint.experimental.v1 as ocp
    import torch

    manifest = json.loads(MANIFEST.read_text())
    n = 2
    keep = [e for e in manifest["keys"]
            if not e["key"].startswith("encoder.block.") or int(e["key"].split(".")[2]) < n]
    tensors = {e["key"]: torch.zeros(e["shape"], dtype=torch.bfloat16) for e in keep}
    src = write_folder(tmp_path / "flan", {**manifest["config"], "num_layers": n}, tensors, "st-sharded")
    del tensors
    assert convert(src, tmp_path / "out") == 0

    stored = ocp.metadata(tmp_path / "out" / "params").metadata
    got = {}
    def walk(node, prefix=""):
        for k, v in node.items():
            walk(v, f"{prefix}{k}/") if isinstance(v, dict) else got.__setitem__(prefix + k, tuple(v.shape))
    walk(stored)
    want = manifest_param_shapes(manifest, n)
    assert got == want
    cfg = T5Config.from_dict(read_meta(tmp_path / "out")["config"])
    assert cfg == T5Config.from_hf({**manifest["config"], "num_layers": n})
    assert (cfg.dense_act_fn, cfg.is_gated_act) == ("gelu_new", True)
    # Parameter count: the manifest's unique total equals ours extrapolated to its 24 layers.
    size = lambda s: int(np.prod(s))  # noqa: E731
    shared = sum(size(s) for k, s in got.items() if not k.startswith("layers/"))
    per_layer = sum(size(s) for k, s in got.items() if k.startswith("layers/")) // n
    assert shared + manifest["config"]["num_layers"] * per_layer == manifest["n_params_unique"]
