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
