"""Multi-process execution: 2 processes x 4 CPU devices (``jax.distributed`` on localhost) train and sample exactly
like 1 process x 8 devices.

Each process holds only its share of the global batch (rows ``[i * B/2, (i + 1) * B/2)``) and turns it into global
arrays (``data.pipeline.global_batch`` / ``jax.make_array_from_process_local_data``); the trainer's jitted step
and the sampler then run on the 8-device mesh that spans both processes. The reference is the same script as one
process with 8 devices. This file is also the worker: ``python tests/test_multiprocess.py OUT PROCESS_ID
NUM_PROCESSES PORT``.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = 8  # global train rows and prompts
STEPS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(out_dir: str, num_processes: int, devices_per_process: int) -> list[subprocess.Popen]:
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    procs = []
    for i in range(num_processes):
        out = os.path.join(out_dir, f"p{num_processes}_{i}.json")
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), out, str(i), str(num_processes),
                                       str(port)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


def _collect(procs, timeout=600) -> None:
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            logs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]


def test_two_processes_equal_one_process(tmp_path):
    single = _launch(str(tmp_path), 1, 8)
    multi = _launch(str(tmp_path), 2, 4)
    _collect(single + multi)
    ref = json.loads((tmp_path / "p1_0.json").read_text())
    runs = [json.loads((tmp_path / f"p2_{i}.json").read_text()) for i in range(2)]
    assert ref["process_count"] == 1 and [r["process_count"] for r in runs] == [2, 2]
    assert [r["local_devices"] for r in runs] == [4, 4] and ref["local_devices"] == 8
    for run in runs:
        # Same losses, step by step (a real optimisation: the loss moves).
        np.testing.assert_allclose(run["losses"], ref["losses"], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(run["grad_norms"], ref["grad_norms"], rtol=1e-5)
        # Same samples: every prompt's bits of every step and its summed codes.
        assert run["bits"] == ref["bits"]
        np.testing.assert_allclose(run["codes"], ref["codes"], atol=1e-6)
    assert len(set(ref["losses"])) == STEPS
    assert ref["bits"][0] != ref["bits"][1], "different prompts must give different samples"


# ---------------------------------------------------------------------------------------------------------------
# Worker
# ---------------------------------------------------------------------------------------------------------------


def _worker(out: str, process_id: int, num_processes: int, port: int) -> None:
    import jax

    if num_processes > 1:
        jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=num_processes,
                                   process_id=process_id)
    jax.config.update("jax_default_matmul_precision", "highest")
    import jax.numpy as jnp
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P

    from infstar_jax import parallel, schedules
    from infstar_jax.aot import apply_overrides, load_config, with_training_sections
    from infstar_jax.data.pipeline import global_batch
    from infstar_jax.sampling.sampler import GuidanceConfig, Sampler
    from infstar_jax.training import batching, step as step_lib, tasks

    assert jax.device_count() == 8 and jax.process_count() == num_processes
    config = with_training_sections(load_config(os.path.join(ROOT, "configs", "tiny.py")))
    config = apply_overrides(config, ["train.var_len=false", f"train.batch_size={ROWS}", "train.lr=0.003",
                                      "data.text_buckets=[8, 16]"])
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    local = ROWS // jax.process_count()
    lo = jax.process_index() * local
    with jax.set_mesh(mesh):
        task = tasks.create(config, mesh, workdir="")
        state = task.init_state()
        sched = batching.resolve_schedule(task.options, schedules.nearest_template(9 / 16), 5)
        shape = batching.step_shape(task.options, sched, tuple(range(sched.num_scales)), 16, ROWS)
        t_lat, h, w, c = shape.latent_shape
        rows = []
        for r in range(lo, lo + local):  # this process's rows only, each from its own seed
            rng = np.random.default_rng(100 + r)
            latent = rng.normal(size=(t_lat, h, w, c)).astype(np.float32)
            text = rng.normal(size=(int(rng.integers(3, 17)), task.model_cfg.text_dim)).astype(np.float32)
            rows.append(batching.row_arrays(shape, latent, text, rng, task.options))
        arrays = global_batch(step_lib.device_arrays(batching.stack_rows(rows)), mesh, task.rules)
        losses, grad_norms = [], []
        for _ in range(STEPS):
            state, metrics = task._step(state, shape, arrays)
            losses.append(float(metrics["loss"]))
            grad_norms.append(float(metrics["grad_norm"]))

        # Sampling with the trained params; prompts split over the batch axes like training rows.
        params = jax.tree.map(lambda x: x * 3 if x.ndim >= 2 else x, state.params)
        sample_sched = schedules.resolve("480p", "16:9", frames=1, num_scales=3, detail_scale_min_tokens=8,
                                         semantic_scales=2)
        rng = np.random.default_rng(7)
        text = rng.normal(size=(ROWS, 6, task.model_cfg.text_dim)).astype(np.float32)
        lens = rng.integers(2, 7, size=ROWS).astype(np.int32)
        keys = jax.random.key_data(jax.random.split(jax.random.key(11), ROWS))
        batch_sh = NamedSharding(mesh, P(("data", "fsdp")))
        to_global = lambda x: jax.make_array_from_process_local_data(batch_sh, x[lo:lo + local])  # noqa: E731
        res = Sampler(task.model_cfg, params, sample_sched, GuidanceConfig("apg", 4.0, 0.05)).run(
            to_global(text), to_global(lens), keys=jax.random.wrap_key_data(to_global(np.asarray(keys))))
        bits = [np.asarray(multihost_utils.process_allgather(b, tiled=True)) for b in res.bits]
        codes = np.asarray(multihost_utils.process_allgather(res.summed_codes, tiled=True))
    result = dict(process_count=jax.process_count(), local_devices=jax.local_device_count(), losses=losses,
                  grad_norms=grad_norms, bits=[np.concatenate([b[i].ravel() for b in bits]).tolist()
                                               for i in range(ROWS)],
                  codes=codes.tolist())
    with open(out, "w") as f:
        json.dump(result, f)
    if num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
