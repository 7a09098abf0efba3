"""The sampler against the reference's AR loop (C_sampling): step by step with teacher forcing, then free-running."""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from goldens import case_params, load_case, sampling_schedule
from infstar_jax import checkpoint
from infstar_jax.convert.transformer import convert_transformer
from infstar_jax.sampling.sampler import GuidanceConfig, Sampler
from infstar_jax.transformer.config import TransformerConfig

pytestmark = [pytest.mark.golden, pytest.mark.sampling, pytest.mark.torch]
CASES = case_params("C_sampling")


@functools.lru_cache(maxsize=None)
def _model(case_dir: Path, tmp_root: str):
    out = Path(tmp_root) / f"{case_dir.name}-gpt"
    convert_transformer(case_dir / "gpt.pth", out, overwrite=True)
    cfg = TransformerConfig.from_dict(checkpoint.read_meta(out)["config"])
    return cfg, jax.tree.map(jnp.asarray, checkpoint.load_params(out, kind="transformer"))


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("sampling"))


def guidance_from_meta(meta) -> GuidanceConfig:
    sa = meta["sampler_args"]
    kind = "apg" if sa["use_apg"] else "cfg"
    return GuidanceConfig(kind, float(sa["cfg"]), float(sa["apg_norm_threshold"]), float(sa["apg_eta"]))


def step_arrays(arrays, k, name):
    return arrays[f"s{k:02d}_{name}"]


def used_bits(arrays, k):
    key = f"s{k:02d}_bits_used"
    return arrays[key] if key in arrays.files else arrays[f"s{k:02d}_bits_sampled"]


def text_inputs(arrays, meta, pad=0):
    """The case's text features, optionally padded with junk rows that the sampler must ignore."""
    feats = arrays["text_features"]
    junk = np.random.default_rng(0).normal(size=(pad, feats.shape[1])).astype(np.float32) * 5
    return jnp.asarray(np.concatenate([feats, junk]))[None], [meta["text_len"]]


def uniforms(arrays, n):
    return [jnp.asarray(step_arrays(arrays, k, "uniforms").reshape(1, -1)) for k in range(n)]


def to_cl(x):
    """torch (1, C, T, H, W) -> ours (1, T, H, W, C)."""
    return np.moveaxis(x, 1, -1)


@pytest.mark.parametrize("case_dir", CASES)
def test_teacher_forced_steps(case_dir, tmp_root):
    meta, arrays = load_case(case_dir)
    cfg, params = _model(Path(case_dir), tmp_root)
    sched = sampling_schedule(meta)
    sampler = Sampler(cfg, params, sched, guidance_from_meta(meta))
    n = len(sampler.steps)
    assert n == meta["n_steps"]
    text, lens = text_inputs(arrays, meta, pad=5)
    forced = {k: jnp.asarray(used_bits(arrays, k))[None] for k in range(n)}
    res = sampler.run(text, lens, uniforms=uniforms(arrays, n), forced=forced, record=True)
    for k, rec in enumerate(res.records):
        what = f"step {k}"
        np.testing.assert_allclose(rec["x_in"], to_cl(step_arrays(arrays, k, "x_in")), atol=1e-6, err_msg=what)
        np.testing.assert_allclose(rec["logits_raw"][0], step_arrays(arrays, k, "logits_raw"), atol=1e-4,
                                   err_msg=what)
        np.testing.assert_allclose(rec["logits_guided"], step_arrays(arrays, k, "logits_guided"), atol=5e-4,
                                   err_msg=what)
        p1 = np.asarray(rec["p1"])
        np.testing.assert_allclose(p1[0], step_arrays(arrays, k, "p1"), atol=1e-4, err_msg=what)
        sampled = (step_arrays(arrays, k, "uniforms") < p1[0]).astype(np.uint8)
        np.testing.assert_array_equal(sampled, step_arrays(arrays, k, "bits_sampled"), err_msg=what)
    np.testing.assert_allclose(res.summed_codes, to_cl(arrays["summed_codes_final"]), atol=1e-6)


@pytest.mark.parametrize("case_dir", CASES)
def test_free_running_bits_and_codes(case_dir, tmp_root):
    meta, arrays = load_case(case_dir)
    cfg, params = _model(Path(case_dir), tmp_root)
    sched = sampling_schedule(meta)
    sampler = Sampler(cfg, params, sched, guidance_from_meta(meta))
    n = len(sampler.steps)
    leaked = {k: jnp.asarray(arrays[f"s{k:02d}_bits_used"])[None] for k in range(n)
              if f"s{k:02d}_bits_used" in arrays.files}
    assert len(leaked) == sum(r["leaked_gt"] for r in meta["steps"])
    text, lens = text_inputs(arrays, meta, pad=5)
    res = sampler.run(text, lens, uniforms=uniforms(arrays, n), forced=leaked, record=True)
    for k in range(n):
        np.testing.assert_array_equal(res.bits[k][0], used_bits(arrays, k), err_msg=f"step {k}")
    np.testing.assert_allclose(res.summed_codes, to_cl(arrays["summed_codes_final"]), atol=1e-6)


@functools.lru_cache(maxsize=None)
def _vae(case_dir: Path, tmp_root: str):
    from infstar_jax.convert.vae import convert_vae
    from infstar_jax.tokenizer.vae import ChunkedVAE, load_vae

    out = Path(tmp_root) / f"{case_dir.name}-vae"
    convert_vae(case_dir / "vae.pth", out, overwrite=True)
    model, variables = load_vae(out)
    return ChunkedVAE(model), variables


@pytest.mark.parametrize("case_dir", CASES)
def test_decoded_frames(case_dir, tmp_root):
    meta, arrays = load_case(case_dir)
    vae, variables = _vae(Path(case_dir), tmp_root)
    codes = jnp.asarray(to_cl(arrays["summed_codes_final"]))
    raw = vae.decode(variables, codes)
    np.testing.assert_allclose(raw, to_cl(arrays["decoded_raw"]), atol=1e-4, rtol=1e-5)
    frames = np.asarray(vae.decode(variables, codes, frames=True))[0]
    want = arrays["frames_uint8_bgr"][..., ::-1]  # the reference's frames are BGR; ours RGB
    assert frames.shape == want.shape and frames.shape[0] == meta["output_frames"]
    diff = np.abs(frames.astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-4


@pytest.mark.parametrize("case_dir", CASES)
def test_conditioning_encode_gives_the_leaked_bits(case_dir, tmp_root):
    """I2V / V2V: transform -> VAE encode (recorded posterior noise) -> multi-scale BSQ = the reference's gt_ls_Bl."""
    from infstar_jax.sampling.pipeline import condition_pixels, leaked_bits

    meta, arrays = load_case(case_dir)
    sched = sampling_schedule(meta)
    n_leak = meta["sampler_args"]["gt_leak"]
    if n_leak <= 0:
        assert "cond_pixels" not in arrays.files
        return
    src = arrays["cond_image_rgb_uint8"] if "cond_image_rgb_uint8" in arrays.files else arrays["cond_video_rgb_uint8"]
    pixels = condition_pixels(src, sched.pixel_hw)
    np.testing.assert_allclose(pixels, to_cl(arrays["cond_pixels"]), atol=1e-6)
    vae, variables = _vae(Path(case_dir), tmp_root)
    latent = vae.encode(variables, jnp.asarray(pixels), eps=jnp.asarray(to_cl(arrays["cond_post_eps"])))
    np.testing.assert_allclose(latent, to_cl(arrays["cond_latent"]), atol=1e-5)
    bits = leaked_bits(latent, sched, n_leak)
    leaked_steps = [r["k"] for r in meta["steps"] if r["leaked_gt"]]
    assert sorted(bits) == leaked_steps
    for k in leaked_steps:
        np.testing.assert_array_equal(bits[k][0], arrays[f"s{k:02d}_bits_used"], err_msg=f"step {k}")
