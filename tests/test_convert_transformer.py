"""Transformer converter: released manifests, architecture inference and the strict refusals."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from goldens import GOLDEN_DIR
from infstar_jax import checkpoint
from infstar_jax.convert.__main__ import main as convert_main
from infstar_jax.convert.common import TensorSource, validate
from infstar_jax.convert.transformer import (architecture_name, expected_params, infer_config, key_table,
                                             layer_keys, reference_shapes)
from infstar_jax.transformer.config import ARCHITECTURES, TransformerConfig, architecture

pytestmark = [pytest.mark.transformer, pytest.mark.torch]

MANIFESTS = GOLDEN_DIR / "D_manifests"


def manifest_models():
    if not (MANIFESTS / "manifest_transformer_8b.json").exists():
        return [("missing", None)]  # a failing case, not a collection error or a silent skip
    out = []
    for name in ("manifest_transformer_8b.json", "manifest_transformer_2b.json"):
        m = json.loads((MANIFESTS / name).read_text())
        out.append((m["architecture"]["model_name"], m))
    others = json.loads((MANIFESTS / "manifest_transformer_others.json").read_text())["models"]
    out += sorted(others.items())
    return out


def shape_source(shapes):
    return TensorSource("manifest", dict(shapes), {k: "float32" for k in shapes}, loader=None)


@pytest.mark.parametrize("name,manifest", manifest_models(), ids=[n for n, _ in manifest_models()])
def test_released_manifests(name, manifest):
    assert manifest is not None, f"no transformer manifests under {MANIFESTS} (set INFSTAR_GOLDEN_DIR)"
    if not manifest.get("buildable", True):
        # infinity_v2b (head_dim 126) cannot be built by the reference either (RoPE assertion).
        assert name not in ARCHITECTURES
        with pytest.raises(ValueError, match="RoPE"):
            TransformerConfig(embed_dim=2016, num_heads=16, num_kv_heads=16, head_dim=126)
        return
    arch = manifest["architecture"]
    cfg = architecture(name)
    assert cfg.num_params() == arch["n_params_total"]
    assert ARCHITECTURES[name]["block_chunks"] == arch["block_chunks"]
    ours = reference_shapes(cfg, arch["block_chunks"])
    if "keys" in manifest:
        theirs = {k["key"]: tuple(k["shape"]) for k in manifest["keys"]}
        assert ours == theirs
        source = shape_source(theirs)
        inferred, chunks = infer_config(source)
        assert inferred == cfg and chunks == arch["block_chunks"]
        assert architecture_name(inferred, chunks) == name
        validate(source, key_table(cfg, layer_keys(source)[0]), expected_params(cfg))
    else:
        assert len(ours) == arch["n_state_dict_keys"]


def tiny_state_dict(seed=0, block_chunks=2):
    cfg = TransformerConfig(depth=2, embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
                            text_dim=24, text_maxlen=16)
    g = torch.Generator().manual_seed(seed)
    return cfg, {k: torch.randn(s, generator=g) for k, s in reference_shapes(cfg, block_chunks).items()}


def run_cli(*argv):
    return convert_main(["transformer", *map(str, argv)])


def test_converts_and_records_architecture(tmp_path):
    cfg, sd = tiny_state_dict()
    torch.save({"trainer": {"gpt_fsdp": sd, "config": {}}, "args": {"lr": 1.0}}, tmp_path / "step.pth")
    assert run_cli("--src", tmp_path / "step.pth", "--out", tmp_path / "out") == 0
    meta = checkpoint.read_meta(tmp_path / "out")
    assert TransformerConfig.from_dict(meta["config"]) == cfg and meta["block_chunks"] == 2
    params = checkpoint.load_params(tmp_path / "out")
    q = sd["block_chunks.1.module.0.attn.q_proj.weight"].numpy()
    np.testing.assert_array_equal(params["blocks"]["attn"]["q_proj"]["kernel"][1], q.T.reshape(64, 4, 16))


@pytest.mark.parametrize("mutation", ["missing", "unexpected", "misshaped"])
def test_refusals_name_the_key(tmp_path, capsys, mutation):
    _, sd = tiny_state_dict()
    key = "block_chunks.1.module.0.mlp.up_proj.weight"
    if mutation == "missing":
        del sd[key]
    elif mutation == "unexpected":
        key = "block_chunks.1.module.0.mlp.extra.weight"
        sd[key] = torch.zeros(3)
    else:
        sd[key] = torch.zeros(127, 64)
    torch.save(sd, tmp_path / "gpt.pth")
    assert run_cli("--src", tmp_path / "gpt.pth", "--out", tmp_path / "out") != 0
    err = capsys.readouterr().err
    assert key in err and {"missing": "missing key", "unexpected": "unexpected key", "misshaped": "shape"}[mutation] in err
    assert not (tmp_path / "out").exists()


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_refuses_code_executing_pickle(tmp_path, capsys):
    _, sd = tiny_state_dict()
    sd_obj = {"state": sd, "evil": _Evil()}
    with open(tmp_path / "evil.pth", "wb") as f:
        torch.save(sd_obj, f)
    assert run_cli("--src", tmp_path / "evil.pth", "--out", tmp_path / "out") != 0
    out = capsys.readouterr()
    assert "weights_only" in out.err and "pwned" not in out.out


def test_sharded_safetensors_follows_index(tmp_path):
    from safetensors.torch import save_file

    _, sd = tiny_state_dict(block_chunks=1)
    keys = sorted(sd)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    for fname, ks in shards.items():
        save_file({k: sd[k].contiguous() for k in ks}, tmp_path / fname)
    index = {"metadata": {"total_size": 0}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert run_cli("--src", tmp_path, "--out", tmp_path / "out") == 0
    params = checkpoint.load_params(tmp_path / "out")
    np.testing.assert_array_equal(params["cfg_uncond"], sd["cfg_uncond"].numpy())
    # A shard named by the index but absent is reported by name.
    (tmp_path / "b.safetensors").unlink()
    assert run_cli("--src", tmp_path, "--out", tmp_path / "out2") != 0


def test_cli_entry_point_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "infstar_jax.convert", "transformer", "--src", tmp_path / "nope.pth",
                           "--out", tmp_path / "out"], capture_output=True, text=True)
    assert proc.returncode != 0 and "nope.pth" in proc.stderr


def test_layer_chunked_leaves_round_trip(tmp_path, monkeypatch):
    """Big stacked leaves are written as layer chunks (bounded converter memory) and reassembled on load, also
    straight into sharded targets."""
    import jax
    from infstar_jax import parallel
    from infstar_jax.transformer.model import init_params

    cfg, sd = tiny_state_dict(block_chunks=1)
    torch.save(sd, tmp_path / "gpt.pth")
    assert run_cli("--src", tmp_path / "gpt.pth", "--out", tmp_path / "whole") == 0
    monkeypatch.setattr("infstar_jax.convert.common.CHUNK_BYTES", 20_000)  # < one layer of the MLP kernels
    assert run_cli("--src", tmp_path / "gpt.pth", "--out", tmp_path / "chunked") == 0
    from infstar_jax.checkpoint import _metadata, chunk_key

    tree = _metadata(tmp_path / "chunked" / "params").metadata
    assert set(tree["blocks"]["mlp"]["gate_proj"]["kernel"]) == {chunk_key(0, 1), chunk_key(1, 2)}
    whole = checkpoint.load_params(tmp_path / "whole")
    chunked = checkpoint.load_params(tmp_path / "chunked")
    jax.tree.map(np.testing.assert_array_equal, chunked, whole)
    mesh = parallel.make_mesh({"fsdp": 4, "tensor": 2})
    target = parallel.abstract_sharded(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))["params"]), mesh)
    sharded = checkpoint.load_params(tmp_path / "chunked", target)
    k = sharded["blocks"]["mlp"]["gate_proj"]["kernel"]
    assert k.sharding == target["blocks"]["mlp"]["gate_proj"]["kernel"].sharding
    jax.tree.map(np.testing.assert_array_equal, sharded, whole)
