"""The launchers' ``--dry-run``: every command printed, in order, with the right flags; nothing executed."""

import importlib.util
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.training

ROOT = Path(__file__).resolve().parents[1]


def dry_run(script, *args, comments: list | None = None, timeout: int = 60):
    """Runs ``python launch/SCRIPT --dry-run ARGS`` in a subprocess; returns its printed commands as argv lists (the
    ``#`` lines, the compiled-ahead check's report, go to ``comments``)."""
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / script), "--dry-run", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("+ ")]
    notes = [line for line in proc.stdout.splitlines() if line.startswith("# ")]
    assert lines and len(lines) + len(notes) == len(proc.stdout.splitlines())
    if comments is not None:
        comments.extend(notes)
    else:
        assert not notes, notes
    return [shlex.split(line[2:].split("    # ")[0]) for line in lines]


def _inner(cmd):
    """The shell command a gcloud/ssh line runs remotely, split into words."""
    arg = cmd[-1]
    return shlex.split(arg.split("=", 1)[1] if arg.startswith("--command=") else arg)


def test_tpu_dry_run():
    cmds = dry_run("tpu.py", "--name", "pod", "--zone", "us-east5-a", "--project", "proj", "--accelerator", "v5p-64",
                   "--spot", "--skip-aot", "--config", "configs/toy.py", "--workdir", "gs://bucket/run", "--env", "A=1",
                   "--config.train.lr=1e-4", "--config.data.cache=gs://bucket/cache")
    describe, create, tar, scp, install, train = cmds
    base = ["gcloud", "compute", "tpus", "tpu-vm"]
    assert describe[:6] == base + ["describe", "pod"]
    assert "--zone=us-east5-a" in describe and "--project=proj" in describe
    assert create[:6] == base + ["create", "pod"]
    assert {"--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5", "--spot", "--zone=us-east5-a"} <= set(create)
    assert tar[:3] == ["tar", "-czf", "/tmp/pod-infstar-jax.tar.gz"] and "--exclude=.git" in tar
    assert tar[-3:] == ["-C", str(ROOT), "."]
    assert scp[:5] == base + ["scp"] and scp[5:7] == ["/tmp/pod-infstar-jax.tar.gz", "pod:infstar-jax.tar.gz"]
    assert "--worker=all" in scp and "--worker=all" in install and "--worker=all" in train
    assert "pip" in install[-1] and "jax[tpu]" in install[-1] and "tar -xzf" in install[-1]
    words = _inner(train)
    assert words[:3] == ["cd", "~/infstar-jax", "&&"]
    i = words.index("python3")
    assert words[i - 1] == "A=1"
    assert words[i:] == ["python3", "-m", "infstar_jax.train", "--config", "configs/toy.py", "--workdir",
                         "gs://bucket/run", "--multihost", "--config.train.lr=1e-4",
                         "--config.data.cache=gs://bucket/cache"]


def test_tpu_dry_run_reuse_and_detach():
    cmds = dry_run("tpu.py", "--name", "pod", "--zone", "z", "--reuse", "--skip-install", "--detach", "--skip-aot",
                   "--config", "configs/toy.py", "--workdir", "gs://b/r")
    assert len(cmds) == 1
    remote = cmds[0][-1]
    assert remote.startswith("--command=nohup bash -c ") and remote.endswith("> ~/infstar-train.log 2>&1 &")
    assert "--multihost" in remote


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (the [test] extra)")
def test_tpu_dry_run_prints_the_aot_verdict_first():
    notes = []
    cmds = dry_run("tpu.py", "--name", "pod", "--zone", "z", "--accelerator", "v5e-4", "--config", "configs/toy.py",
                   "--workdir", "gs://b/r", "--config.train.lr=1e-4", comments=notes, timeout=300)
    aot = cmds[0]
    assert aot[1:] == ["-m", "infstar_jax.aot", "--config", "configs/toy.py", "--topology", "v5e-4", "--what", "train",
                       "--config.train.lr=1e-4"]
    assert [c[4] for c in cmds[1:3]] == ["describe", "create"]  # the check comes before any VM
    rows = [n for n in notes if n.startswith("# | train_step |")]
    assert len(rows) == 1 and "| v5e:2x2 |" in rows[0] and "| fits (" in rows[0]
    assert notes[-1].startswith("# aot verdict: the train step compiles for v5e-4 and fits")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (the [test] extra)")
def test_tpu_launch_stops_when_the_step_does_not_fit():
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "tpu.py"), "--dry-run", "--name", "pod", "--zone",
                           "z", "--accelerator", "v5e-4", "--config", "configs/toy.py", "--workdir", "gs://b/r",
                           "--config.train.batch_size=20000"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "does not fit v5e-4" in proc.stderr
    assert "| does not fit: needs" in proc.stdout
    assert "gcloud" not in proc.stdout  # nothing about the slice was even printed


def test_gpu_dry_run(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# cluster\nnode-a slots=8\nnode-b slots=8\nnode-c\n")
    cmds = dry_run("gpu.py", "--hostfile", str(hostfile), "--user", "me", "--port", "1234", "--install",
                   "--config", "configs/toy.py", "--workdir", "/shared/run", "--config.train.steps=5")
    mk, sync = cmds[0:6:2], cmds[1:6:2]
    assert [c[:2] for c in mk] == [["ssh", f"me@node-{h}"] for h in "abc"]
    assert all(c[0] == "rsync" and c[-1] == f"me@node-{h}:~/infstar-jax/" for c, h in zip(sync, "abc"))
    installs, runs = cmds[6:9], cmds[9:]
    assert all("pip install" in c[-1] for c in installs)
    assert len(runs) == 3
    for i, (cmd, h) in enumerate(zip(runs, "abc")):
        assert cmd[:2] == ["ssh", f"me@node-{h}"]
        words = _inner(cmd)
        assert words[:3] == ["cd", "~/infstar-jax", "&&"]
        assert words[3:] == ["python3", "-m", "infstar_jax.train", "--config", "configs/toy.py", "--workdir",
                             "/shared/run", "--multihost", "--coordinator_address=node-a:1234", "--num_processes=3",
                             f"--process_id={i}", "--config.train.steps=5"]


def test_local_dry_run():
    (single,) = dry_run("local.py", "--config", "configs/toy.py", "--workdir", "runs/toy", "--config.seed=3")
    assert single[1:] == ["-m", "infstar_jax.train", "--config", "configs/toy.py", "--workdir", "runs/toy",
                          "--config.seed=3"]
    cmds = dry_run("local.py", "--processes", "2", "--gpus-per-process", "4", "--port", "999",
                   "--config", "configs/toy.py", "--workdir", "runs/x")
    for i, cmd in enumerate(cmds):
        assert cmd[0] == f"CUDA_VISIBLE_DEVICES={','.join(str(g) for g in range(4 * i, 4 * i + 4))}"
        assert cmd[-4:] == ["--multihost", "--coordinator_address=localhost:999", "--num_processes=2",
                            f"--process_id={i}"]
    cpu = dry_run("local.py", "--processes", "2", "--cpu-devices", "4", "--config", "configs/toy.py",
                  "--workdir", "runs/x")
    assert {"JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=4",
            "JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo"} <= set(cpu[0])


def test_launchers_refuse_unknown_arguments():
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "local.py"), "--dry-run", "--config", "c.py",
                           "--workdir", "w", "--bogus"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--bogus" in proc.stderr and "--config.train.lr" in proc.stderr
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "gpu.py"), "--dry-run", "--hosts", "a,a",
                           "--config", "c.py", "--workdir", "w"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "repeat" in proc.stderr


@pytest.mark.slow
def test_local_two_process_run(tmp_path):
    """A real 2-process run on simulated CPU devices (jax.distributed + gloo): per-process data states in the
    checkpoints, a resume, and the export written by both processes into one folder."""
    from test_train_loop import SMALL, fill_random_cache

    from infstar_jax.training import metrics as metrics_lib

    fill_random_cache(str(tmp_path / "cache"), 12, seed=4)
    args = [sys.executable, str(ROOT / "launch" / "local.py"), "--processes", "2", "--cpu-devices", "2",
            "--port", "18479", "--config", "configs/toy.py", "--workdir", str(tmp_path / "run"),
            f"--config.data.cache={tmp_path / 'cache'}", "--config.train.batch_size=4",
            "--config.train.lr_schedule=constant", "--config.checkpoint.every_steps=2", "--config.log.every_steps=1",
            "--config.log.progress=False", "--config.schedule.num_scales=3", "--config.schedule.image_rep=(2,2,2)",
            "--config.schedule.video_rep=(2,2,1)", *[f"--config.model.overrides.{k}={v}" for k, v in SMALL.items()]]
    for steps in (3, 5):
        proc = subprocess.run([*args, f"--config.train.steps={steps}"], cwd=ROOT, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resuming from checkpoint 3" in proc.stderr  # the first run saved at its last step
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "5" / "data").glob("process_*")) == \
        ["process_0-of-2.json", "process_1-of-2.json"]
    records = metrics_lib.read_metrics(str(tmp_path / "run"))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[-1]["data/skipped_all_processes"] == 0
    assert (tmp_path / "run" / "export" / "transformer" / "infstar.json").exists()
