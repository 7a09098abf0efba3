"""Pod readiness of the released 8B model (slow: minutes and a few GB of host RAM per compile; run one at a time).

``python -m pytest tests/test_aot_slow.py -m slow -s`` prints the tables of docs/pod-readiness.md:

* the trainer's step at the longest 480p 5 s packed rows (40,320 tokens) for v5p-64 (v5p:4x4x2, 32 chips, one row
  per chip) and v6e-64 (v6e:8x8: one row per chip does not fit, one row per 2 chips with context=2 does);
* the sampler's largest step, the 720p last scale (72,000 query tokens x 2 rows for guidance), for v5e-8 and v6e-8.

Each configuration docs/pod-readiness.md recommends must compile and fit the chip's HBM.
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


@pytest.mark.parametrize("topology,mesh,rows", [("v5p:4x4x2", "fsdp=32", 32), ("v6e:8x8", "fsdp=32,context=2", 32)])
def test_8b_train_step_480p_5s_fits(topology, mesh, rows):
    r = _run("480p", topology, mesh, "train", batch=rows)["train_step"]
    assert r.error is None and r.fits, r.verdict
    assert f"{rows} rows x 40320 tokens" in r.description and r.unknown_loops == 0
    # fp32 params and 2 Adam moments of 8.2 B parameters, sharded over fsdp: the argument is the per-chip share of
    # the 98 GB state (plus the batch).
    fsdp = int(mesh.split(",")[0].split("=")[1])
    assert 3 * 4 * 8.2e9 / fsdp < r.argument < 3 * 4 * 8.2e9 / fsdp * 1.2
    # 6 N T matmul FLOPs (+ remat) per row of T = 40,320 tokens, N = 8.2 B, rows shared by chips / rows chips.
    per_row = aot.parse_topology(topology).chips // rows
    assert 6 * 8.2e9 * 40320 / per_row < r.matmul_flops < 8 * 8.8e9 * 40320 / per_row


def test_8b_train_step_one_row_per_v6e_chip_does_not_fit():
    """v6e-64 with one 40,320-token row per chip: the compiler refuses (the saved residual stream alone is 23.8 GB
    of its 32 GiB); docs/pod-readiness.md gives the fitting mesh (fsdp=32, context=2) tested above."""
    r = _run("480p", "v6e:8x8", "fsdp=64", "train", batch=64)["train_step"]
    assert not r.fits and r.total > r.available > 30 * GIB, r.error
    assert r.verdict.startswith("does not fit: needs")


@pytest.mark.parametrize("topology", ["v5e:2x4", "v6e:2x4"])
def test_8b_sampler_720p_last_scale_fits(topology):
    reports = _run("720p", topology, "tensor=8", "sample")
    r = reports["sample_largest"]
    assert r.error is None and r.fits, r.verdict
    assert "72000 queries" in r.description and "3600 ref" in r.description
    assert reports["sample_text"].fits
