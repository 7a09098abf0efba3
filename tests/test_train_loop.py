"""The training loop on the toy config: the loss falls, skipped samples are counted, weights are exported; a run
killed with SIGKILL resumes from its last checkpoint with the same data order and losses as an uninterrupted run;
SIGTERM saves and exits; checkpoints restore onto other meshes; fine-tuning starts from converted weights."""

import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from infstar_jax import checkpoint, parallel, schedules
from infstar_jax.data import cache as cache_mod
from infstar_jax.data import metadata as md
from infstar_jax.training import loop, metrics as metrics_lib, tasks

pytestmark = pytest.mark.training

ROOT = Path(__file__).resolve().parents[1]
# A smaller toy: 3 scales a clip (3x3 latents), one block of width 32.
SMALL = dict(depth=1, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
SCHEDULE = dict(num_scales=3, image_rep=(2, 2, 2), video_rep=(2, 2, 1))


def toy_config():
    spec = importlib.util.spec_from_file_location("toy_config", ROOT / "configs" / "toy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def fill_random_cache(root, n, *, side=3, frames=17, text_dim=64, seed=0):
    """A token cache of ``n`` 1 s clips with random latents around a fixed per-channel pattern (so coarse bits are
    learnable) and random text features of 3-11 rows."""
    cache = cache_mod.TokenCache(root)
    cache.ensure_info(SCHEDULE["num_scales"], 16)
    rng = np.random.default_rng(seed)
    base = rng.normal(size=64).astype(np.float32)
    pt = schedules.latent_frames(frames)
    keys = []
    for i in range(n):
        s = md.Sample(kind="video", path=f"/data/{i}.mp4", source_path=f"{i}.mp4", captions=(f"clip {i}",),
                      caption_weights=(1.0,), origin=f"meta.jsonl:{i}", begin_frame_id=0, end_frame_id=frames - 1,
                      fps=16.0)
        latent = (base + 0.5 * rng.normal(size=(pt, side, side, 64))).astype(np.float32)
        text = rng.normal(size=(int(rng.integers(3, 12)), text_dim)).astype(np.float32)
        meta = {f.name: getattr(s, f.name) for f in dataclasses.fields(md.Sample)}
        meta.update(real_duration=(frames - 1) / 16, caption=s.captions[0], template=1.0, pn=3, video_fps=16)
        cache.write(s.key, latent, text, meta)
        keys.append(s.key)
    return keys


def small_config(cache, **train):
    c = toy_config()
    c.data.cache = str(cache)
    c.model.overrides = dict(c.model.overrides, **SMALL)
    c.schedule.update(SCHEDULE)
    c.train.update(dict(dict(steps=12, batch_size=8, lr=3e-3, lr_schedule="constant", warmup_steps=0), **train))
    c.log.every_steps = 1
    c.log.progress = False
    return c


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    fill_random_cache(str(root), 16)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """12 steps on 8 devices (fsdp=8) from a cache where one entry's latent is unreadable."""
    root = tmp_path_factory.mktemp("bad_cache")
    keys = fill_random_cache(str(root), 16, seed=1)
    shutil.rmtree(root / "arrays" / keys[5] / "latent")
    workdir = tmp_path_factory.mktemp("run")
    c = small_config(root)
    c.checkpoint.every_steps = 6
    summary = loop.run(c, str(workdir))
    return c, workdir, summary


def test_toy_training_reduces_the_loss_and_counts_skips(trained):
    c, workdir, summary = trained
    records = metrics_lib.read_metrics(str(workdir))
    assert [r["step"] for r in records] == list(range(1, 13))
    losses = np.asarray([r["loss"] for r in records])
    assert np.isfinite(losses).all()
    assert losses[-3:].mean() < losses[:3].mean() - 0.05, losses
    assert records[-1]["acc"] > records[0]["acc"]
    # 16 entries in batches of 8: the unreadable one is met once per epoch (6 epochs), its row becomes a placeholder
    assert records[-1]["data/skipped/cache_unreadable"] == 6 and records[-1]["data/skipped"] == 6
    assert all(r["compile_time"] > 0 for r in records[:1]) and "tokens_per_s" in records[-1]
    assert "mfu" not in records[-1]  # CPU: no known peak
    for g in ("image_semantic", "image_detail", "video_semantic", "video_detail"):
        assert 0 <= records[-1][f"acc/{g}"] <= 1
    shapes = json.loads((workdir / "step_shapes.json").read_text())
    assert len(shapes) == 1 and shapes[0]["visual_len"] == 1 + 4 + 9 + 4 * 14
    # The exported weights are a converted-style checkpoint of the trained params.
    meta = checkpoint.read_meta(summary["export"])
    assert meta["kind"] == "transformer" and meta["config"]["depth"] == 1 and meta["step"] == 12
    params = checkpoint.load_params(summary["export"], kind="transformer")
    assert params["blocks"]["attn"]["q_proj"]["kernel"].shape == (1, 32, 4, 8)
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["train"]["steps"] == 12 and saved["task"] == "transformer"


def test_restore_onto_other_meshes(trained):
    c, workdir, _ = trained
    c = tasks.add_training_config(c)
    manager = loop.checkpoint_manager(str(workdir / "checkpoints"), c.checkpoint)
    assert manager.all_steps() == [6, 12]
    restored = {}
    for name, shape, devices in (("2x2x2", {"data": 2, "fsdp": 2, "tensor": 2}, None),
                                 ("one", {"fsdp": 1}, jax.devices()[:1])):
        mesh = parallel.make_mesh(shape, devices=devices)
        with jax.set_mesh(mesh):
            task = tasks.create(c, mesh, str(workdir))
            state = loop.restore(manager, 12, task, task.data())
            kernel = state.params["blocks"]["mlp"]["up_proj"]["kernel"]
            assert kernel.sharding.mesh.shape == mesh.shape and int(state.step) == 12
            restored[name] = jax.tree.map(np.asarray, state)
    manager.close()
    jax.tree.map(np.testing.assert_array_equal, restored["2x2x2"], restored["one"])
    exported = checkpoint.load_params(workdir / "export" / "transformer", kind="transformer")
    jax.tree.map(np.testing.assert_array_equal, restored["one"].params, exported)


def test_fine_tune_starts_from_converted_weights(cache_dir, tmp_path):
    c = tasks.add_training_config(small_config(cache_dir))
    mesh = parallel.make_mesh({"fsdp": 2}, devices=jax.devices()[:2])
    with jax.set_mesh(mesh):
        task = tasks.create(c, mesh, str(tmp_path / "run"))
        rng = np.random.default_rng(0)
        params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), task.abstract_state().params)
        src = tmp_path / "converted"
        checkpoint.save_params(src, params, {"kind": "transformer", "config": task.model_cfg.to_dict()})
        c.train.init_from = str(src)
        state = tasks.create(c, mesh, str(tmp_path / "run")).init_state()
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), params)
        assert int(state.step) == 0 and not np.asarray(state.opt_state[1][0].mu["head"]["kernel"]).any()
        other = tmp_path / "other"
        cfg = dataclasses.replace(task.model_cfg, depth=2).to_dict()
        checkpoint.save_params(other, jax.tree.map(lambda a: a, params), {"kind": "transformer", "config": cfg})
        c.train.init_from = str(other)
        with pytest.raises(ValueError, match="architecture differs.*depth"):
            tasks.create(c, mesh, str(tmp_path / "run")).init_state()


# ---- killed and preempted runs (subprocesses) -------------------------------------------------------------------


def _env(tmp_root):
    env = dict(os.environ)
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(tmp_root / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONPATH=str(ROOT))
    return env


def _command(cache, workdir, steps, every=3):
    over = dict(SMALL)
    args = [sys.executable, "-m", "infstar_jax.train", "--config", str(ROOT / "configs" / "toy.py"),
            "--workdir", str(workdir), f"--config.data.cache={cache}", f"--config.train.steps={steps}",
            "--config.train.batch_size=4", "--config.train.lr=0.003", "--config.train.lr_schedule=constant",
            "--config.train.warmup_steps=0", f"--config.checkpoint.every_steps={every}", "--config.log.every_steps=1",
            "--config.log.progress=False", "--config.schedule.num_scales=3", "--config.schedule.image_rep=(2,2,2)",
            "--config.schedule.video_rep=(2,2,1)"]
    args += [f"--config.model.overrides.{k}={v}" for k, v in over.items()]
    return args


def _run(args, env, timeout=300):
    proc = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _logged_steps(workdir):
    records = metrics_lib.read_metrics(str(workdir))
    return records[-1]["step"] if records else 0


def _wait(proc, cond, timeout=240):
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before it could be interrupted: "
                                 f"{proc.stderr.read()[-4000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def _latest_checkpoint(workdir):
    folder = Path(workdir) / "checkpoints"
    steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.exists() else []
    return max(steps) if steps else None


@pytest.fixture(scope="module")
def sub_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sub")
    fill_random_cache(str(root / "cache"), 12, seed=2)
    return root


def test_sigkill_resume_matches_uninterrupted_run(sub_root):
    env, cache = _env(sub_root), sub_root / "cache"
    killed = sub_root / "killed"
    proc = subprocess.Popen(_command(cache, killed, steps=500), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        # Kill mid-run, after a checkpoint and a few more steps.
        _wait(proc, lambda: (_latest_checkpoint(killed) or 0) >= 3 and _logged_steps(killed) >= 5)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    last = _latest_checkpoint(killed)
    logged = _logged_steps(killed)
    assert last is not None and 3 <= last < 500 and last % 3 == 0
    before = {r["step"]: r for r in metrics_lib.read_metrics(str(killed))}
    total = last + 4
    _run(_command(cache, killed, steps=total), env)  # resumes from `last`
    resumed = {r["step"]: r for r in metrics_lib.read_metrics(str(killed))}
    straight = sub_root / "straight"
    _run(_command(cache, straight, steps=total), env)
    ref = {r["step"]: r for r in metrics_lib.read_metrics(str(straight))}
    assert sorted(ref) == sorted(resumed) == list(range(1, total + 1))
    for s in range(1, total + 1):
        a, b = resumed[s], ref[s]
        assert (a["data/batch"], a["data/keys_crc"]) == (b["data/batch"], b["data/keys_crc"]), s
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6, err_msg=f"step {s}")
        np.testing.assert_allclose(a["acc"], b["acc"], rtol=1e-6, err_msg=f"step {s}")
        if s <= logged:  # what the killed run logged before dying agrees too
            np.testing.assert_allclose(before[s]["loss"], b["loss"], rtol=1e-6, err_msg=f"step {s}")
    assert len({r["data/keys_crc"] for r in ref.values()}) > 3  # the data order is not trivially constant


def test_sigterm_saves_and_exits(sub_root):
    env, cache = _env(sub_root), sub_root / "cache"
    workdir = sub_root / "terminated"
    proc = subprocess.Popen(_command(cache, workdir, steps=500, every=1000), env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait(proc, lambda: _logged_steps(workdir) >= 2)
        os.kill(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, proc.stderr.read()[-4000:]
    stopped = _logged_steps(workdir)
    assert 2 <= stopped < 500
    assert _latest_checkpoint(workdir) == stopped  # saved at the step it stopped, not at an interval
    assert not (workdir / "export").exists()  # an interrupted run does not export


def test_cli_completes_presets_without_training_sections(tmp_path):
    """configs/tiny.py names no train/data sections; their keys can still be overridden on the command line."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "infstar_jax.train", "--config", "configs/tiny.py", "--workdir",
                           str(tmp_path / "run"), "--config.train.steps=3", "--config.data.text_buckets=(8,16)"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "data.cache is empty" in proc.stderr, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-m", "infstar_jax.train", "--config", "configs/missing.py", "--workdir",
                           str(tmp_path / "run")], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "configs/missing.py' does not exist" in proc.stderr


def test_metric_chunks_and_resumed_steps(tmp_path):
    w = metrics_lib.MetricWriter(str(tmp_path), chunk_records=3, tensorboard=False, chunked=True)  # as on gs://
    for s in range(1, 8):
        w.write(s, {"loss": float(s)})
    w.close()
    names = sorted(p.name for p in (tmp_path / "metrics").iterdir())
    assert names == ["0000-000000001.jsonl", "0000-000000004.jsonl", "0000-000000007.jsonl"]
    resumed = metrics_lib.MetricWriter(str(tmp_path), chunk_records=3, tensorboard=False, chunked=True)
    # (killed at 7, resumed from a checkpoint at 5)
    for s in (6, 7, 8):
        resumed.write(s, {"loss": 10.0 * s})
    records = metrics_lib.read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["loss"] for r in records] == [1, 2, 3, 4, 5, 60, 70, 80]
    metrics_lib.MetricWriter(str(tmp_path / "other"), active=False).write(1, {"loss": 1.0})
    assert not (tmp_path / "other").exists()  # processes other than 0 write nothing
    local = metrics_lib.MetricWriter(str(tmp_path / "local"), tensorboard=False)  # a local folder: one appended file
    local.write(1, {"loss": 1.0})
    local.close()
    with open(tmp_path / "local" / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "loss": 2.0}\n{"step": 1, "loss": 3.0}\n{"step": 3, "lo')  # a resume, then a cut line
    assert [(r["step"], r["loss"]) for r in metrics_lib.read_metrics(str(tmp_path / "local"))] == [(1, 3.0), (2, 2.0)]
