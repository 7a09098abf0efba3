"""Train on this machine: one process, or several processes with a local coordinator (one per GPU group, or
simulated CPU devices to rehearse a multi-host run).

    python launch/local.py --config configs/toy.py --workdir runs/toy --config.data.cache=toy_cache
    python launch/local.py --processes 2 --gpus-per-process 4 --config configs/infinity_qwen2_2b.py --workdir runs/2b
    python launch/local.py --processes 2 --cpu-devices 4 --config configs/toy.py --workdir runs/rehearsal

Each command is printed; ``--dry-run`` prints them without running anything.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from launch import common  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python launch/local.py", description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=1, help="training processes (default 1)")
    p.add_argument("--port", type=int, default=8476, help="coordinator port (several processes)")
    dev = p.add_mutually_exclusive_group()
    dev.add_argument("--gpus-per-process", type=int, help="GPUs per process (sets CUDA_VISIBLE_DEVICES)")
    dev.add_argument("--cpu-devices", type=int, help="simulated CPU devices per process (JAX_PLATFORMS=cpu)")
    p.add_argument("--python", default=sys.executable, help="python to run (default: this one)")
    common.add_train_arguments(p)
    return p


def process_env(args, i: int) -> dict[str, str]:
    env = dict(args.env_vars)
    if args.gpus_per_process:
        k = args.gpus_per_process
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in range(i * k, (i + 1) * k))
    if args.cpu_devices:
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={args.cpu_devices}")
        if args.processes > 1:
            env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
    return env


def main(argv=None) -> int:
    args = common.parse(parser(), argv)
    if args.processes < 1:
        raise SystemExit(f"--processes must be >= 1, got {args.processes}")
    sh = common.Shell(args.dry_run)
    if args.processes == 1:
        return sh.run(common.train_command(args, args.python), env=process_env(args, 0), check=False)
    procs = []
    for i in range(args.processes):
        extra = ["--multihost", f"--coordinator_address=localhost:{args.port}",
                 f"--num_processes={args.processes}", f"--process_id={i}"]
        procs.append(sh.start(common.train_command(args, args.python, extra), env=process_env(args, i),
                              note=f"process {i}"))
    return common.wait_all(procs)


if __name__ == "__main__":
    sys.exit(main())
