"""Train on several GPU hosts over ssh: one process per host (all its GPUs), process 0's host coordinates.

    python launch/gpu.py --hosts gpu-a,gpu-b --config configs/infinity_qwen8b.py --workdir /shared/runs/8b \\
        --config.train.batch_size=16

Steps (each printed; ``--dry-run`` prints them without running anything):

1. ``rsync`` the working tree to ``--remote-dir`` on every host (``--no-sync`` skips it; a shared filesystem needs
   no copy) and, with ``--install``, ``pip install -e`` it there.
2. Start ``python -m infstar_jax.train --multihost --coordinator_address=HOST0:PORT --num_processes=N
   --process_id=I ...`` on every host at once and wait; if one process fails the others are stopped.
``--workdir`` must be visible to every host (shared filesystem or a gs:// URL).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from launch import common  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python launch/gpu.py", description=__doc__.splitlines()[0])
    hosts = p.add_mutually_exclusive_group(required=True)
    hosts.add_argument("--hosts", help="comma-separated host names (process i runs on host i)")
    hosts.add_argument("--hostfile", help="file with one host per line")
    p.add_argument("--port", type=int, default=8476, help="coordinator port on the first host")
    p.add_argument("--user", help="ssh user")
    p.add_argument("--remote-dir", default="~/infstar-jax", help="code directory on the hosts")
    p.add_argument("--python", default="python3", help="python on the hosts")
    p.add_argument("--no-sync", action="store_true", help="do not rsync the code")
    p.add_argument("--install", action="store_true", help="pip install -e the code on every host")
    common.add_train_arguments(p)
    return p


def read_hosts(args) -> list[str]:
    if args.hosts:
        hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    else:
        path = Path(args.hostfile)
        if not path.exists():
            raise SystemExit(f"hostfile {path} does not exist")
        hosts = [line.split()[0] for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not hosts:
        raise SystemExit("no hosts given")
    if len(set(hosts)) != len(hosts):
        raise SystemExit(f"hosts repeat: {hosts} (one process per host)")
    return hosts


def main(argv=None) -> int:
    args = common.parse(parser(), argv)
    hosts = read_hosts(args)
    sh = common.Shell(args.dry_run)
    target = [f"{args.user}@{h}" if args.user else h for h in hosts]
    if not args.no_sync:
        for t in target:
            ex = [f"--exclude={e}" for e in common.PACKAGE_EXCLUDES]
            sh.run(["ssh", t, f"mkdir -p {args.remote_dir}"])
            sh.run(["rsync", "-az", "--delete", *ex, f"{common.REPO}/", f"{t}:{args.remote_dir}/"])
    if args.install:
        for t in target:
            sh.run(["ssh", t, f"cd {args.remote_dir} && {args.python} -m pip install -q -e '.[video,text]'"])
    coordinator = f"{hosts[0]}:{args.port}"
    procs = []
    for i, t in enumerate(target):
        extra = ["--multihost", f"--coordinator_address={coordinator}", f"--num_processes={len(hosts)}",
                 f"--process_id={i}"]
        remote = common.remote_shell(common.train_command(args, args.python, extra), args.env_vars, args.remote_dir)
        procs.append(sh.start(["ssh", t, remote], note=f"process {i}"))
    return common.wait_all(procs)


if __name__ == "__main__":
    sys.exit(main())
