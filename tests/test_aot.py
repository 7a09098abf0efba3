"""Ahead-of-time compilation for TPU topologies through libtpu (no TPU needed): the tiny config's train step and
the sampler's largest step compile for v5e:2x2 and v5p:2x2x1, with memory/FLOP/collective accounting checked
against programs whose numbers are known."""

import json
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from infstar_jax import aot

pytestmark = pytest.mark.sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
GIB = 1024**3

needs_libtpu = pytest.mark.skipif(not aot.libtpu_available(), reason="libtpu (the [test] extra) is not installed")


def tiny_config():
    # A 3-scale pyramid has no released var-len outcomes: the trainer runs it with every scale kept.
    return aot.apply_overrides(aot.with_training_sections(aot.load_config(TINY)), ["train.var_len=false"])


@pytest.fixture(scope="module")
def tiny():
    return tiny_config()


def _devices(name):
    return aot.topology_devices(aot.parse_topology(name))


@pytest.fixture(scope="module", params=["v5e:2x2", "v5p:2x2x1"])
def compiled_tiny(request, tiny):
    """(topology, mesh, {program: (compiled, report)}) for the train step and the sampler's largest step."""
    topo = aot.parse_topology(request.param)
    cfg = aot._model_cfg(tiny)
    mesh = aot.build_mesh(aot.topology_devices(topo), {"fsdp": 2, "tensor": 2}, cfg)
    rules = aot.config_lib.mesh_rules(tiny)
    programs = aot.train_programs(tiny, mesh) + [p for p in aot.sample_programs(tiny, mesh)
                                                 if p.name == "sample_largest"]
    return topo, mesh, {p.name: aot.compile_program(p, mesh, topo, rules) for p in programs}


@needs_libtpu
def test_tiny_train_and_sampler_compile_for_tpu(compiled_tiny):
    topo, mesh, results = compiled_tiny
    assert set(results) == {"train_step", "sample_largest"}
    for name, (compiled, report) in results.items():
        assert compiled is not None, report.error
        assert report.fits and report.error is None
        assert report.hbm == aot.HBM_GIB[topo.generation] * GIB
        assert report.total == report.argument + report.output - report.alias + report.temp + report.code
        assert 0 < report.total < 1 * GIB
        assert report.mesh == "fsdp=2,tensor=2" and report.unknown_loops == 0
        # The attention ran as the Pallas splash kernel (a Mosaic custom call), not the CPU/GPU per-block path.
        text = compiled.as_text()
        assert "tpu_custom_call" in text and "splash_mha" in text, name
        # fsdp-sharded parameters are gathered, gradients reduced: there is traffic, and it is counted per kind.
        assert report.collectives and all(v["bytes"] > 0 for v in report.collectives.values())
        assert report.flops > report.matmul_flops > 0 and report.attention_flops > 0
    compiled, train = results["train_step"]
    # Donated train state: its output buffers alias the inputs.
    assert train.alias > 0 and train.output >= train.alias
    # It is the trainer's step (training.step.train_step): new TrainState and its metrics.
    state, metrics = jax.tree_util.tree_unflatten(compiled.out_tree, [0] * compiled.out_tree.num_leaves)
    assert type(state).__name__ == "TrainState"
    assert {"loss", "acc", "grad_norm", "lr", "block_loss", "block_acc", "rows"} <= set(metrics)


@needs_libtpu
def test_train_step_arguments_are_the_per_chip_shards(compiled_tiny):
    """Argument bytes per chip >= the bytes of the per-chip shards of params, optimizer state and batch (TPU tiles
    may pad small arrays), and far below the unsharded total."""
    topo, mesh, results = compiled_tiny
    compiled, report = results["train_step"]
    program = next(p for p in aot.train_programs(tiny_config(), mesh))
    leaves = jax.tree.leaves(program.args)
    shard = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in leaves)
    full = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)
    assert shard <= report.argument < full


@needs_libtpu
def test_flops_and_collectives_of_known_programs():
    """The HLO accounting on programs with known answers: a scanned matmul (loop trip counts) and an fsdp gather."""
    devices = _devices("v5e:2x2")
    mesh = jax.sharding.Mesh(np.array(devices), ("x",))
    n, steps = 256, 7

    def scanned(x, w):
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0]

    rep = NamedSharding(mesh, P())
    compiled = jax.jit(scanned, in_shardings=(rep, rep)).lower(
        jax.ShapeDtypeStruct((n, n), jnp.float32), jax.ShapeDtypeStruct((steps, n, n), jnp.float32)).compile()
    hlo = aot.HloModule(compiled.as_text())
    assert hlo.unknown_trip_counts == 0
    assert hlo.matmul_flops() == 2 * n**3 * steps

    def gather(w, x):
        w = jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P()))
        return x @ w

    compiled = jax.jit(gather, in_shardings=(NamedSharding(mesh, P("x")), rep), out_shardings=rep).lower(
        jax.ShapeDtypeStruct((1024, 512), jnp.float32), jax.ShapeDtypeStruct((8, 1024), jnp.float32)).compile()
    stats = aot.collective_stats(compiled.as_text())
    moved = sum(v["bytes"] for v in stats.values())
    # Each chip contributes its quarter of w (512 KiB); however XLA spells the gather, that much enters it.
    assert moved >= 1024 * 512 * 4 // 4, stats


@needs_libtpu
def test_program_too_large_for_hbm_is_reported_not_raised():
    """v5e has 16 GiB per chip: a replicated 20 GiB output cannot fit; the compiler's refusal becomes the verdict."""
    devices = _devices("v5e:2x2")
    topo = aot.parse_topology("v5e:2x2")
    mesh = aot.build_mesh(devices, {"fsdp": 4}, aot._model_cfg(tiny_config()))
    rep = NamedSharding(mesh, P())
    big = jax.jit(lambda x: jnp.broadcast_to(x, (5, 1024, 1024, 1024)) * 2.0, in_shardings=rep, out_shardings=rep)
    program = aot.Program("too_big", big, (jax.ShapeDtypeStruct((1024,), jnp.float32, sharding=rep),), {}, "20 GiB")
    compiled, report = aot.compile_program(program, mesh, topo, ())
    assert compiled is None and not report.fits
    assert report.total is not None and report.total > 16 * GIB, report.error
    assert 15 * GIB < report.available <= 16 * GIB
    assert report.verdict.startswith("does not fit: needs 20.00 GiB, the compiler has ")


def test_verdict_wording():
    r = aot.Report("p", "", "v5e:2x2", "fsdp=4", 16 * GIB, 1.0, fits=False, argument=0, output=0, alias=0,
                   temp=18 * GIB, code=0, total=18 * GIB)
    assert r.verdict == "does not fit: over by 2.00 GiB"
    r = aot.Report("p", "", "v5e:2x2", "fsdp=4", 16 * GIB, 1.0, fits=True, total=GIB // 2)
    assert r.verdict == "fits (15.50 GiB free)"


def test_topology_names():
    assert aot.parse_topology("v5p:4x4x2") == aot.Topology("v5p", (4, 4, 2))
    assert aot.parse_topology("v5p-64").chips == 32  # v5p/v4 slice names count TensorCores (2 per chip)
    assert aot.parse_topology("v6e-64") == aot.Topology("v6e", (8, 8))
    assert aot.parse_topology("v5litepod-8") == aot.parse_topology("v5e-8") == aot.Topology("v5e", (2, 4))
    assert aot.parse_topology("V4:2x2x1").hbm_bytes == 32 * GIB
    for bad in ("v7x:2x2", "v5e:2x2x2", "v5p:2x2", "tpu", "v5e-3", "v6e:0x4"):
        with pytest.raises(aot.AotError, match="valid: GEN:AxB"):
            aot.parse_topology(bad)


@needs_libtpu
def test_topology_devices_match_the_generation():
    for name, n, kind in [("v5e:2x4", 8, "TPU v5 lite"), ("v4:2x2x1", 4, "TPU v4"), ("v6e:2x2", 4, "TPU v6 lite"),
                          ("v5p:2x2x2", 8, "TPU v5")]:
        devices = _devices(name)
        assert len(devices) == n and {d.device_kind for d in devices} == {kind}


@needs_libtpu
def test_mesh_refusals_list_valid_meshes(tiny):
    devices = _devices("v5e:2x2")
    cfg = aot._model_cfg(tiny)  # 4 heads, 2 kv heads
    with pytest.raises(aot.AotError, match=r"has 6 devices, the topology has 4.*valid meshes.*fsdp=4; fsdp=2,tensor=2"):
        aot.build_mesh(devices, aot.parse_mesh("fsdp=3,tensor=2"), cfg)
    with pytest.raises(aot.AotError, match=r"tensor=4 does not divide the model dimensions \[2\]"):
        aot.build_mesh(devices, {"tensor": 4}, cfg)
    with pytest.raises(aot.AotError, match="does not divide the 4 chips"):
        aot.build_mesh(devices, {"fsdp": -1, "tensor": 3}, cfg)
    with pytest.raises(aot.AotError, match="expected comma-separated AXIS=SIZE"):
        aot.parse_mesh("fsdp:4")
    mesh = aot.build_mesh(devices, {"data": 2, "fsdp": -1}, cfg)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "context": 1, "tensor": 1}


def test_missing_libtpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(aot, "libtpu_available", lambda: False)
    with pytest.raises(aot.AotError, match="needs libtpu"):
        aot.topology_devices(aot.parse_topology("v5e:2x2"))


@needs_libtpu
def test_cli_writes_report_and_loadable_executables(tmp_path):
    out, report = tmp_path / "tiny.aot", tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "infstar_jax.aot", "--config", TINY, "--topology", "v5p-8", "--what", "sample",
         "--mesh", "fsdp=4", "--out", str(out), "--json", str(report)],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| sample_largest | v5p:2x2x1 | fsdp=4 |" in proc.stdout
    rows = json.loads(report.read_text())
    assert [r["program"] for r in rows] == ["sample_text", "sample_largest"]
    assert all(r["fits"] and r["verdict"].startswith("fits") for r in rows)
    saved = pickle.loads(out.read_bytes())
    assert saved["topology"] == "v5p:2x2x1" and set(saved["programs"]) == {"sample_text", "sample_largest"}
    for p in saved["programs"].values():
        assert isinstance(p["executable"], bytes) and len(p["executable"]) > 1000
    # The executable's input structure is the sampler step's (params, text, valid) call.
    assert saved["programs"]["sample_text"]["in_tree"].num_leaves > 3

    bad = subprocess.run([sys.executable, "-m", "infstar_jax.aot", "--config", TINY, "--topology", "v9:2x2"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "unknown TPU topology 'v9:2x2'" in bad.stderr
