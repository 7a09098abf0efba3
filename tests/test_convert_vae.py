"""``python -m infstar_jax.convert vae``: golden checkpoints convert exactly, the released key/shape manifest is accepted,
and every malformed checkpoint is refused with a non-zero exit naming the offending key."""

import json

import numpy as np
import pytest

from goldens import GOLDEN_DIR, case_dirs
from infstar_jax.checkpoint import load_params, read_meta
from infstar_jax.convert.__main__ import main
from infstar_jax.convert.common import TensorSource, validate
from infstar_jax.convert.vae import IGNORED, expected_params, infer_config, key_table, torch_key

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.tokenizer, pytest.mark.torch]

MANIFEST = GOLDEN_DIR / "D_manifests" / "manifest_vae.json"


def _golden_pths():
    pths = [d / "vae.pth" for d in case_dirs("A_tokenizer") if (d / "vae.pth").exists()]
    if not pths:
        return [pytest.param(None, id="A_tokenizer-vae-missing")]
    return [pytest.param(p, id=p.parent.name) for p in pths]


def _first_golden():
    p = _golden_pths()[0].values[0]
    if p is None:
        raise AssertionError(f"no A_tokenizer case with a vae.pth under {GOLDEN_DIR}")
    return p


def _state_dict(pth):
    return dict(torch.load(pth, map_location="cpu", weights_only=True)["vae"])


def _convert(capsys, src, out, *extra):
    rc = main(["vae", "--src", str(src), "--out", str(out), *extra])
    return rc, capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------------
# Accepted checkpoints
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.golden
@pytest.mark.parametrize("pth", _golden_pths())
def test_golden_checkpoint_converts_exactly(pth, tmp_path, capsys):
    if pth is None:
        raise AssertionError(f"no A_tokenizer case with a vae.pth under {GOLDEN_DIR}")
    case_meta = json.loads((pth.parent / "meta.json").read_text())
    rc, err = _convert(capsys, pth, tmp_path / "vae")
    assert rc == 0, err
    meta = read_meta(tmp_path / "vae")
    arch = case_meta["architecture"]
    assert meta["kind"] == "vae" and meta["weights"] == "vae"
    cfg = meta["config"]
    assert cfg["block_out_channels"] == arch["block_out_channels"]
    assert cfg["layers_per_block"] == arch["layers_per_block"]
    assert cfg["latent_channels"] == arch["latent_channels"]
    assert cfg["temporal_compression_list"] == arch["temporal_compression_list"]
    assert cfg["spatial_compression_list"] == arch["spatial_compression_list"]
    params = load_params(tmp_path / "vae")
    sd = _state_dict(pth)
    np.testing.assert_array_equal(params["scale"], sd["scale_learnable_parameters"][0].numpy())
    np.testing.assert_array_equal(params["proj_down"]["kernel"], sd["proj_down.weight"].numpy().T)
    np.testing.assert_array_equal(params["proj_up"]["bias"], sd["proj_up.bias"].numpy())
    w = sd["decoder.up_blocks.2.upsamplers.0.conv.conv.conv.weight"].numpy()
    np.testing.assert_array_equal(params["decoder"]["up_blocks_2"]["upsampler"]["conv"]["kernel"], w.transpose(2, 3, 4, 1, 0))
    g = sd["encoder.down_blocks.1.resnets.0.norm2.gamma"].numpy()
    np.testing.assert_array_equal(params["encoder"]["down_blocks_1"]["resnets_0"]["norm2"]["gamma"], g.reshape(-1))
    g = sd["decoder.norm_out.norm_layer.gamma"].numpy()
    np.testing.assert_array_equal(params["decoder"]["norm_out"]["norm_layer"]["gamma"], g.reshape(-1))
    # Every converted tensor came from exactly one torch key; the rest are the explicitly ignored ones.
    used = {torch_key(p) for p in expected_params(infer_config({k: tuple(v.shape) for k, v in sd.items()}))}
    assert used | (set(sd) & set(IGNORED)) == set(sd)
    assert set(sd) & set(IGNORED) == set(IGNORED)  # the golden files hold all 8 ignored keys


def _manifest_shapes():
    m = json.loads(MANIFEST.read_text())
    return m, {e["key"]: tuple(e["shape"]) for e in m["keys"]}


def test_released_manifest_is_accepted_without_allocating():
    m, shapes = _manifest_shapes()
    assert len(shapes) == m["n_state_dict_keys"] == 301
    cfg = infer_config(shapes)
    assert cfg.block_out_channels == (96, 192, 384, 384, 384)
    assert (cfg.layers_per_block, cfg.latent_channels, cfg.in_channels, cfg.out_channels) == (2, 16, 3, 3)
    assert cfg.temporal_compression_list == (2, 2) and cfg.spatial_compression_list == (2, 2, 2)
    expected = expected_params(cfg)
    source = TensorSource("manifest", shapes, {k: "float32" for k in shapes}, loader=None)
    validate(source, key_table(expected), expected)  # raises on any missing / unexpected / mis-shaped key
    # Parameter count: the release's minus the unused proj_*_two (2 x (64*64 + 64)) and scale[1:] (3).
    n = sum(int(np.prod(s)) for s, _ in expected.values())
    assert n == m["n_params"] - 2 * (64 * 64 + 64) - 3
    assert set(IGNORED) <= set(shapes)


@pytest.mark.slow
def test_released_manifest_zeros_checkpoint_converts(tmp_path, capsys):
    _, shapes = _manifest_shapes()
    m = json.loads(MANIFEST.read_text())
    dtypes = {e["key"]: getattr(torch, e["dtype"]) for e in m["keys"]}
    sd = {k: torch.zeros(s, dtype=dtypes[k]) for k, s in shapes.items()}
    torch.save({"vae": sd, "step": torch.tensor(0)}, tmp_path / "infinitystar_videovae.pth")
    del sd
    rc, err = _convert(capsys, tmp_path / "infinitystar_videovae.pth", tmp_path / "out")
    assert rc == 0, err
    params = load_params(tmp_path / "out")
    expected = expected_params(infer_config(shapes))
    import jax

    flat = {tuple(str(k.key) for k in kp): v for kp, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert {p: tuple(v.shape) for p, v in flat.items()} == {p: s for p, (s, _) in expected.items()}


def test_ema_weights_and_extra_top_level_entries(tmp_path, capsys):
    sd = _state_dict(_first_golden())
    ema = {k: (v * 2 if v.is_floating_point() else v) for k, v in sd.items()}
    torch.save({"vae": sd, "ema": ema, "optimizer": {"lr": torch.tensor(1.0)}}, tmp_path / "both.pth")
    rc, err = _convert(capsys, tmp_path / "both.pth", tmp_path / "ema", "--ema")
    assert rc == 0, err
    assert read_meta(tmp_path / "ema")["weights"] == "ema"
    np.testing.assert_array_equal(load_params(tmp_path / "ema")["scale"], 2 * sd["scale_learnable_parameters"][0].numpy())
    # Without the ignored aliases / buffers / unused projections the checkpoint still converts.
    slim = {k: v for k, v in sd.items() if k not in IGNORED}
    torch.save({"vae": slim}, tmp_path / "slim.pth")
    rc, err = _convert(capsys, tmp_path / "slim.pth", tmp_path / "slim")
    assert rc == 0, err


# ----------------------------------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------------------------------


def _refused(tmp_path, capsys, obj, *extra):
    torch.save(obj, tmp_path / "bad.pth")
    rc, err = _convert(capsys, tmp_path / "bad.pth", tmp_path / "out", *extra)
    assert rc != 0
    assert not (tmp_path / "out").exists()
    return err


def test_refuses_missing_key(tmp_path, capsys):
    sd = _state_dict(_first_golden())
    del sd["decoder.up_blocks.2.resnets.1.conv2.conv.weight"]
    err = _refused(tmp_path, capsys, {"vae": sd})
    assert "missing key 'decoder.up_blocks.2.resnets.1.conv2.conv.weight'" in err


def test_refuses_unexpected_key(tmp_path, capsys):
    sd = _state_dict(_first_golden())
    sd["decoder.up_blocks.0.resnets.0.temb_proj.weight"] = torch.zeros(32, 512)
    err = _refused(tmp_path, capsys, {"vae": sd})
    assert "unexpected key 'decoder.up_blocks.0.resnets.0.temb_proj.weight'" in err


@pytest.mark.parametrize(
    "key,shape",
    [("proj_up.weight", (64, 32)), ("scale_learnable_parameters", (3,)), ("encoder.down_blocks.0.resnets.1.conv1.conv.weight", (8, 8, 3, 3, 1))],
)
def test_refuses_misshaped_key(tmp_path, capsys, key, shape):
    sd = _state_dict(_first_golden())
    sd[key] = torch.zeros(shape)
    err = _refused(tmp_path, capsys, {"vae": sd})
    assert f"key {key!r} has shape {shape}" in err


def test_refuses_missing_vae_entry_and_missing_ema(tmp_path, capsys):
    sd = _state_dict(_first_golden())
    err = _refused(tmp_path, capsys, sd)  # a bare state dict, not {'vae': ...}
    assert "no state dict found" in err and "['vae']" in err
    err = _refused(tmp_path, capsys, {"vae": sd}, "--ema")
    assert "['ema']" in err


def test_refuses_non_vae_checkpoint(tmp_path, capsys):
    err = _refused(tmp_path, capsys, {"vae": {"blocks.0.attn.mat_qkv.weight": torch.zeros(4, 4)}})
    assert "encoder.down_blocks.0.resnets.0.conv1.conv.weight" in err and "video VAE" in err


class _Evil:
    def __reduce__(self):
        return (print, ("this pickle runs code",))


def test_refuses_code_executing_pickle(tmp_path, capsys):
    err = _refused(tmp_path, capsys, {"vae": {"x": _Evil()}})
    assert "weights_only=True" in err
    rc, err = _convert(capsys, tmp_path / "nonexistent.pth", tmp_path / "out2")
    assert rc != 0 and "does not exist" in err
