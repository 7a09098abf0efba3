"""Discovery of golden cases: every folder with a meta.json under $INFSTAR_GOLDEN_DIR/<category>/."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

GOLDEN_DIR = Path(os.environ.get("INFSTAR_GOLDEN_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "golden"))


def case_dirs(category: str) -> list[Path]:
    root = GOLDEN_DIR / category
    return sorted(p.parent for p in root.glob("*/meta.json"))


def case_params(category: str, exclude: tuple[str, ...] = ()):
    """pytest params, one per case folder; a missing or empty category is a failing param, never a silent skip."""
    dirs = [d for d in case_dirs(category) if d.name not in exclude]
    if not dirs:
        return [pytest.param(None, id=f"{category}-missing")]
    return [pytest.param(d, id=d.name) for d in dirs]


def load_case(case_dir):
    if case_dir is None:
        raise AssertionError(f"no golden cases found under {GOLDEN_DIR} (set INFSTAR_GOLDEN_DIR)")
    meta = json.loads((Path(case_dir) / "meta.json").read_text())
    arrays = np.load(Path(case_dir) / "arrays.npz") if (Path(case_dir) / "arrays.npz").exists() else None
    return meta, arrays


def sampling_schedule(meta):
    """The ``schedules.Schedule`` a C_sampling case was run with, built from its own ``sampler_args``."""
    import re

    from infstar_jax import schedules

    sa = meta["sampler_args"]
    pn = sa["pn"]
    if pn in schedules.PIXEL_LEVELS:
        resolution, num_scales = pn, schedules.PIXEL_LEVELS[pn]
    else:
        m = re.fullmatch(r"tiny(\d+)", pn)
        assert m, f"unknown pn {pn!r}"
        resolution, num_scales = "480p", int(m.group(1))
    return schedules.resolve(
        resolution, aspect=sa["h_div_w_request"], frames=sa["num_frames"], num_scales=num_scales,
        image_rep=sa["image_scale_repetition"], video_rep=sa["video_scale_repetition"],
        semantic_scales=sa["semantic_scales"], detail_scale_min_tokens=sa["detail_scale_min_tokens"],
        tau_image=sa["tau_image"], tau_video=sa["tau_video"],
    )
