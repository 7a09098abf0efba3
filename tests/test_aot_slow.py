"""Pod readiness of the released 8B model (slow: minutes and a few GB of host RAM per compile; run one at a time).

``python -m pytest tests/test_aot_slow.py -m slow -s`` prints the tables of docs/pod-readiness.md:

* the trainer's step at the longest 480p 5 s packed rows (40,320 tokens, one row per chip) for v5p-64 (v5p:4x4x2,
  32 chips) and v6e-64 (v6e:8x8);
* the sampler's largest step, the 720p last scale (72,000 query tokens x 2 rows for guidance), for v5e-8 and v6e-8.

Each row must compile and fit the chip's HBM with the mesh given here (the configurations docs/pod-readiness.md
recommends).
"""

import os

import pytest

from infstar_jax import aot

pytestmark = [pytest.mark.slow, pytest.mark.sharding,
              pytest.mark.skipif(not aot.libtpu_available(), reason="libtpu (the [test] extra) is not installed")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024**3


def _config(arg: str):
    return aot.with_training_sections(aot.load_config(os.path.join(ROOT, "configs", f"infinity_qwen8b.py:{arg}")))


def _run(arg, topology, mesh, what, **kw):
    reports = aot.run(_config(arg), topology, mesh=mesh, what=what, **kw)
    print("\n" + aot.format_table(reports))
    for r in reports:
        print(f"{r.program}: {r.description}")
    return {r.program: r for r in reports}


@pytest.mark.parametrize("topology,mesh", [("v5p:4x4x2", "fsdp=32"), ("v6e:8x8", "fsdp=64")])
def test_8b_train_step_480p_5s_fits(topology, mesh):
    chips = aot.parse_topology(topology).chips
    r = _run("480p", topology, mesh, "train", batch=chips)["train_step"]
    assert r.error is None and r.fits, r.verdict
    assert "40320 tokens" in r.description and r.unknown_loops == 0
    # fp32 params and 2 Adam moments of 8.2 B parameters, sharded over every chip: the argument is the per-chip
    # share of the 98 GB state (plus the batch).
    assert 3 * 4 * 8.2e9 / chips < r.argument < 3 * 4 * 8.2e9 / chips * 1.2
    # One row per chip: 6 N T matmul FLOPs (+ remat) per chip for N = 8.2 B, T = 40,320 tokens.
    assert 6 * 8.2e9 * 40320 < r.matmul_flops < 8 * 8.8e9 * 40320


@pytest.mark.parametrize("topology", ["v5e:2x4", "v6e:2x4"])
def test_8b_sampler_720p_last_scale_fits(topology):
    reports = _run("720p", topology, "tensor=8", "sample")
    r = reports["sample_largest"]
    assert r.error is None and r.fits, r.verdict
    assert "72000 queries" in r.description and "3600 ref" in r.description
    assert reports["sample_text"].fits
