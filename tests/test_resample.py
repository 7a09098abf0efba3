"""Resampling primitives (area / trilinear / joint C,H,W) against the reference's golden ops and PyTorch itself."""

import json

import jax
import numpy as np
import pytest

from goldens import case_params, load_case
from infstar_jax.tokenizer.resample import area_resize, down3, interp_chw, trilinear_resize

EPS32 = float(np.finfo(np.float32).eps)

# Golden op kinds this module implements; `nearest_*`, `patchify`, `unpatchify` belong to the VAE (tokenizer/vae.py).
MY_KINDS = ("down3", "trilinear", "interp_chw_area", "interp_chw_trilinear")


def op_kind(op: dict) -> str:
    name, mode = op["name"], op.get("mode")
    if name.startswith("interp_CHW_") and mode in ("area", "trilinear"):
        return f"interp_chw_{mode}"
    if name.startswith("down3_") and mode == "area":
        return "down3"
    if name.startswith("trilinear_") and mode == "trilinear":
        return "trilinear"
    return "other"


def resample_cases():
    """A_tokenizer case folders that hold resampling ops (`meta.ops`); model cases are tested in test_multiscale.py."""
    params = case_params("A_tokenizer")
    picked = [p for p in params if p.values[0] is None or "ops" in json.loads((p.values[0] / "meta.json").read_text())]
    return picked or [pytest.param(None, id="A_tokenizer-no-resample-case")]


def to_cl(x):
    """torch (B, C, T, H, W) -> channels-last (B, T, H, W, C)."""
    return np.moveaxis(np.asarray(x), 1, -1)


def run_op(kind: str, op: dict, x_cl: np.ndarray) -> np.ndarray:
    size = tuple(op["size"])
    if kind == "down3":
        fn = lambda x: down3(x, size)  # noqa: E731
    elif kind == "trilinear":
        fn = lambda x: trilinear_resize(x, size, axes=(1, 2, 3))  # noqa: E731
    else:  # interp_chw_*: the reference's size is (C1, T, H1, W1); T is never resampled
        c1, _, h1, w1 = size
        mode = kind.removeprefix("interp_chw_")
        fn = lambda x: interp_chw(x, (c1, h1, w1), mode)  # noqa: E731
    return np.asarray(jax.jit(fn)(x_cl))


def area_tolerance(x: np.ndarray, in_sizes, out_sizes) -> float:
    """Area sums a window in a different order than torch's sequential fp32 sum: the two roundings differ by about
    sqrt(window volume) ulps of the input magnitude."""
    window = np.prod([-(-n // m) + (n % m != 0) for n, m in zip(in_sizes, out_sizes)])
    return 2.0 * EPS32 * max(1.0, float(np.abs(x).max())) * float(np.sqrt(window))


def tolerance(kind: str, op: dict, x_cl: np.ndarray) -> float:
    if kind == "trilinear" or kind == "interp_chw_trilinear":
        # bit-exact on CPU (same fp32 roundings as torch); a few ulps elsewhere
        return 2.0 * EPS32 * max(1.0, float(np.abs(x_cl).max()))
    in_shape, out_shape = op["in_shape"], op["out_shape"]
    axes = (2, 3, 4) if kind == "down3" else (1, 3, 4)
    return area_tolerance(x_cl, [in_shape[a] for a in axes], [out_shape[a] for a in axes])


@pytest.mark.golden
@pytest.mark.tokenizer
@pytest.mark.parametrize("case_dir", resample_cases())
def test_golden_resample_ops(case_dir):
    meta, arrays = load_case(case_dir)
    kinds = {}
    for op in meta["ops"]:
        kinds.setdefault(op_kind(op), []).append(op)
    for kind in MY_KINDS:
        assert kinds.get(kind), f"{case_dir.name}: no golden op of kind {kind}"
    failures = []
    for kind in MY_KINDS:
        for op in kinds[kind]:
            x = to_cl(arrays[f"{op['name']}/in"])
            want = to_cl(arrays[f"{op['name']}/out"])
            got = run_op(kind, op, x)
            if got.shape != want.shape:
                failures.append(f"{op['name']}: shape {got.shape} != {want.shape}")
                continue
            err = float(np.abs(got.astype(np.float64) - want).max())
            tol = tolerance(kind, op, x)
            if err > tol:
                failures.append(f"{op['name']}: max |diff| {err:.3g} > {tol:.3g}")
    assert not failures, "\n".join(failures)


def _window_mean_reference(x: np.ndarray, out: tuple, axes: tuple) -> np.ndarray:
    """Independent float64 adaptive average pooling: loops over output cells, windows [floor(on/m), ceil((o+1)n/m))."""
    x = np.moveaxis(x.astype(np.float64), axes, range(len(axes)))
    res = np.zeros(tuple(out) + x.shape[len(axes):])
    for idx in np.ndindex(*out):
        sl = tuple(
            slice((o * n) // m, -((-(o + 1) * n) // m)) for o, n, m in zip(idx, x.shape[: len(axes)], out)
        )
        res[idx] = x[sl].mean(axis=tuple(range(len(axes))))
    return np.moveaxis(res, range(len(axes)), axes)


@pytest.mark.tokenizer
@pytest.mark.parametrize(
    "in_shape,out,axes",
    [
        ((2, 1, 30, 53, 3), (1, 18, 32), (1, 2, 3)),
        ((1, 4, 7, 11, 2), (3, 3, 5), (1, 2, 3)),
        ((1, 2, 5, 9, 64), (16, 2, 4), (4, 2, 3)),
        ((1, 1, 45, 80, 4), (1, 1, 1), (1, 2, 3)),
    ],
)
def test_area_is_window_mean(in_shape, out, axes):
    x = np.random.default_rng(0).standard_normal(in_shape).astype(np.float32)
    got = np.asarray(jax.jit(lambda v: area_resize(v, out, axes))(x))
    want = _window_mean_reference(x, out, axes)
    in_sizes = [in_shape[a] for a in axes]
    np.testing.assert_allclose(got, want, rtol=0, atol=area_tolerance(x, in_sizes, out))


@pytest.mark.tokenizer
def test_identity_sizes_copy_exactly_and_constants_are_preserved():
    x = np.random.default_rng(1).standard_normal((1, 3, 6, 7, 16)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(trilinear_resize(x, (3, 6, 7), (1, 2, 3))), x)
    np.testing.assert_array_equal(np.asarray(down3(x, (3, 6, 7))), x)
    np.testing.assert_array_equal(np.asarray(interp_chw(x, (16, 6, 7), "area")), x)
    c = np.full((1, 2, 5, 9, 16), 0.75, np.float32)
    np.testing.assert_allclose(np.asarray(interp_chw(c, (64, 13, 17), "trilinear")), 0.75, rtol=0, atol=1e-7)
    np.testing.assert_allclose(np.asarray(interp_chw(c, (4, 2, 3), "area")), 0.75, rtol=0, atol=1e-7)


@pytest.mark.tokenizer
def test_bad_arguments_raise():
    x = np.zeros((1, 1, 4, 4, 8), np.float32)
    with pytest.raises(ValueError, match="mode"):
        interp_chw(x, (8, 2, 2), "nearest")
    with pytest.raises(ValueError, match="same length"):
        area_resize(x, (2, 2), axes=(1, 2, 3))
    with pytest.raises(ValueError, match="out of range"):
        trilinear_resize(x, (2,), axes=(7,))
    with pytest.raises(ValueError, match="down3"):
        down3(x[0], (1, 2, 2))


@pytest.mark.torch
@pytest.mark.tokenizer
@pytest.mark.parametrize(
    "in_thw,out_thw",
    [((1, 2, 3), (1, 45, 80)), ((4, 3, 5), (4, 9, 16)), ((5, 7, 3), (2, 4, 8)), ((20, 24, 43), (20, 30, 53))],
)
def test_matches_torch_interpolate(in_thw, out_thw):
    torch = pytest.importorskip("torch")  # the [convert] extra; the golden test above covers the same numerics
    F = torch.nn.functional
    x = np.random.default_rng(2).standard_normal((1, 3) + in_thw).astype(np.float32)
    want_tri = F.interpolate(torch.from_numpy(x), size=out_thw, mode="trilinear", align_corners=False).numpy()
    got_tri = np.asarray(jax.jit(lambda v: trilinear_resize(v, out_thw, (1, 2, 3)))(to_cl(x)))
    np.testing.assert_allclose(got_tri, to_cl(want_tri), rtol=0, atol=EPS32 * max(1.0, np.abs(x).max()))
    want_area = F.interpolate(torch.from_numpy(want_tri), size=in_thw, mode="area").numpy()
    got_area = np.asarray(jax.jit(lambda v: down3(v, in_thw))(to_cl(want_tri)))
    np.testing.assert_allclose(got_area, to_cl(want_area), rtol=0, atol=area_tolerance(want_tri, out_thw, in_thw))
