"""Golden parity of the video VAE with the PyTorch reference (A_tokenizer): every case folder holding a ``vae.pth``.

Each case's ``vae.pth`` goes through the real converter (``python -m infstar_jax.convert vae``), then the chunked
encoder / decoder run on the case's own inputs, chunked as the reference chunks them (``meta.json`` lists the chunks).
Tolerances from the A_tokenizer README: latents / posterior atol 1e-5, pixels atol 1e-4 (rtol 1e-5), uint8 frames
|d| <= 1 on < 0.01 % of values (truncation boundaries). Torch layout ``B,C,T,H,W`` is moved to channels-last here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from goldens import GOLDEN_DIR, case_dirs, load_case
from infstar_jax.convert.vae import convert_vae
from infstar_jax.tokenizer.frames import frames_to_pixels, pixels_to_frames
from infstar_jax.tokenizer.layers import nearest_resize, patchify, unpatchify
from infstar_jax.tokenizer.vae import ChunkedVAE, VideoVAE, decoder_chunks, encoder_chunks, load_vae, posterior_from_features

pytestmark = [pytest.mark.golden, pytest.mark.tokenizer]

LATENT_ATOL = 1e-5
PIXEL_ATOL, PIXEL_RTOL = 1e-4, 1e-5


def _model_cases():
    dirs = [d for d in case_dirs("A_tokenizer") if (d / "vae.pth").exists()]
    if not dirs:
        return [pytest.param(None, id="A_tokenizer-vae-missing")]
    return [pytest.param(d, id=d.name) for d in dirs]


MODEL_CASES = _model_cases()


def cl(x):
    """Torch ``B,C,T,H,W`` -> channels-last ``B,T,H,W,C``."""
    return np.moveaxis(np.asarray(x), 1, -1)


@functools.lru_cache(maxsize=None)
def _run(case_dir, out_root):
    """Converts the case's checkpoint and runs everything once; returns a dict of channels-last numpy results."""
    meta, arrays = load_case(case_dir)
    out, cfg = convert_vae(case_dir / "vae.pth", out_root / case_dir.name)
    model, variables = load_vae(out)
    assert list(cfg.block_out_channels) == meta["architecture"]["block_out_channels"]
    runner = ChunkedVAE(model)
    pixels = jnp.asarray(cl(arrays["input_pixels"]))
    res = {"meta": meta, "arrays": arrays, "model": model, "variables": variables}
    enc = runner.encode_features(variables, pixels)
    res["enc_out"] = enc
    res["posterior_mean"], res["posterior_logvar"], res["posterior_std"] = posterior_from_features(enc)
    eps = jnp.asarray(cl(arrays["posterior_eps"]))
    res["latent"] = runner.encode(variables, pixels, eps=eps)
    z = res["posterior_mean"] + res["posterior_std"] * eps
    res["latent_sampled"] = z
    res["latent_proj"] = jax.jit(lambda v, z: model.apply(v, z, method=lambda m, z: m.proj_down(z)))(variables, z)
    for name, src in (("dec_latent", "latent"), ("dec_codes", "summed_codes")):
        lat = jnp.asarray(cl(arrays[src]))
        up = jax.jit(lambda v, x: model.apply(v, x / v["params"]["scale"], method=lambda m, x: m.proj_up(x)))
        res[f"{name}_proj_up"] = up(variables, lat)
        res[f"{name}_unpatchified"] = jax.jit(lambda v, x: model.apply(v, x, method=VideoVAE.decoder_input))(variables, lat)
        res[f"{name}_raw"] = runner.decode(variables, lat)
    res["frames"] = runner.decode(variables, jnp.asarray(cl(arrays["summed_codes"])), frames=True)
    return {k: (np.asarray(v) if isinstance(v, jax.Array) else v) for k, v in res.items()}


@pytest.fixture(scope="module")
def out_root(tmp_path_factory):
    return tmp_path_factory.mktemp("vae_golden")


def _close(ours, ref, atol, rtol=0.0, what=""):
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs reference {ref.shape}"
    err = np.abs(ours.astype(np.float64) - ref)
    bound = atol + rtol * np.abs(ref)
    assert np.all(err <= bound), f"{what}: max |d| {err.max():.3g} (atol {atol}, rtol {rtol}), at {np.unravel_index(np.argmax(err - bound), err.shape)}"


@pytest.mark.parametrize("case_dir", MODEL_CASES)
def test_chunk_plans_match_reference(case_dir):
    meta, _ = load_case(case_dir)
    t = meta["input"]["frames"]
    enc = [tuple(c["input_frames"]) for c in meta["encoder_chunks"]]
    assert encoder_chunks(t, meta["architecture"]["num_sample_frames_batch_size"]) == enc
    t_lat = meta["latent_shape"][2]
    dec = [(*c["latent_frames"], c["split_first"]) for c in meta["decoder_chunks"]]
    assert decoder_chunks(t_lat, meta["architecture"]["num_latent_frames_batch_size"]) == dec


@pytest.mark.parametrize("case_dir", MODEL_CASES)
def test_encoder_and_posterior(case_dir, out_root):
    res = _run(case_dir, out_root)
    a = res["arrays"]
    for name in ("enc_out", "posterior_mean", "posterior_logvar", "posterior_std"):
        _close(res[name], cl(a[name]), LATENT_ATOL, what=name)


@pytest.mark.parametrize("case_dir", MODEL_CASES)
def test_latent_with_injected_eps(case_dir, out_root):
    res = _run(case_dir, out_root)
    a = res["arrays"]
    for name in ("latent_sampled", "latent_proj", "latent"):
        _close(res[name], cl(a[name]), LATENT_ATOL, what=name)


@pytest.mark.parametrize("case_dir", MODEL_CASES)
@pytest.mark.parametrize("which", ["dec_latent", "dec_codes"])
def test_decode(case_dir, which, out_root):
    res = _run(case_dir, out_root)
    a = res["arrays"]
    _close(res[f"{which}_proj_up"], cl(a[f"{which}_proj_up"]), LATENT_ATOL, what=f"{which}_proj_up")
    _close(res[f"{which}_unpatchified"], cl(a[f"{which}_unpatchified"]), LATENT_ATOL, what=f"{which}_unpatchified")
    _close(res[f"{which}_raw"], cl(a[f"{which}_raw"]), PIXEL_ATOL, PIXEL_RTOL, what=f"{which}_raw")


@pytest.mark.parametrize("case_dir", MODEL_CASES)
def test_uint8_frames(case_dir, out_root):
    res = _run(case_dir, out_root)
    ref = res["arrays"]["frames_u8_bgr"][..., ::-1]  # stored BGR; ours are RGB
    ours = res["frames"]
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    assert diff.max() <= 1, f"uint8 frames differ by up to {diff.max()}"
    assert np.count_nonzero(diff) < 1e-4 * diff.size, f"{np.count_nonzero(diff)} of {diff.size} values differ by 1"
    # The same conversion applied to the reference's own raw pixels must give its frames exactly.
    exact = np.asarray(pixels_to_frames(jnp.asarray(cl(res["arrays"]["dec_codes_raw"]))))
    np.testing.assert_array_equal(exact, ref)


@pytest.mark.parametrize("case_dir", MODEL_CASES)
def test_frames_to_pixels(case_dir):
    _, a = load_case(case_dir)
    pixels = frames_to_pixels(jnp.asarray(a["input_u8"]))[None]
    np.testing.assert_array_equal(np.asarray(pixels), cl(a["input_pixels"]))


def _primitive_ops():
    d = GOLDEN_DIR / "A_tokenizer" / "resample_primitives"
    if not (d / "meta.json").exists():
        return [pytest.param(None, id="resample_primitives-missing")]
    meta, _ = load_case(d)
    ops = [o for o in meta["ops"] if o["name"].startswith("nearest_") or o["name"] in ("patchify", "unpatchify")]
    return [pytest.param(o, id=o["name"]) for o in ops]


@pytest.mark.parametrize("op", _primitive_ops())
def test_resample_primitives(op):
    if op is None:
        raise AssertionError(f"no resample_primitives case under {GOLDEN_DIR}/A_tokenizer")
    _, a = load_case(GOLDEN_DIR / "A_tokenizer" / "resample_primitives")
    x = jnp.asarray(cl(a[f"{op['name']}/in"]))
    if op["name"] == "patchify":
        y = patchify(x)
    elif op["name"] == "unpatchify":
        y = unpatchify(x)
    else:
        y = nearest_resize(x, op["size"])
    np.testing.assert_array_equal(np.asarray(y), cl(a[f"{op['name']}/out"]))
