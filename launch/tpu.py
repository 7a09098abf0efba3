"""Train on a Cloud TPU VM slice: create it (or reuse it), copy and install the code on every worker, run the trainer
on ``--worker=all`` with ``jax.distributed.initialize()`` (``--multihost``).

    python launch/tpu.py --name my-v5p --zone us-east5-a --accelerator v5p-64 \\
        --config configs/infinity_qwen8b.py --workdir gs://BUCKET/runs/8b-ft --config.train.init_from=gs://BUCKET/8b

Steps (each printed; ``--dry-run`` prints them without running anything but step 0):

0. The compiled-ahead check (``python -m infstar_jax.aot --topology ACCELERATOR --what train``, on this machine
   with libtpu; no TPU needed): the train step compiled for the slice, its per-chip memory table and a verdict. A
   step that does not fit stops the launch before any VM exists. ``--skip-aot`` skips it.
1. ``gcloud compute tpus tpu-vm describe`` the slice; if it does not exist, ``create`` it (``--spot`` for spot
   capacity). ``--reuse`` skips both (the slice must exist).
2. Package the working tree with ``tar`` and ``scp`` it to every worker (``--worker=all``).
3. Unpack and ``pip install -e`` it with ``jax[tpu]`` on every worker (``--skip-install`` skips this step and 2).
4. Run ``python -m infstar_jax.train --multihost ...`` on every worker (``--detach``: under ``nohup``, output in
   ``~/infstar-train.log`` on each worker). Re-running the same command after a preemption resumes from the last
   checkpoint in ``--workdir`` (use a gs:// workdir: workers' disks do not survive a re-creation).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from launch import common  # noqa: E402

# Default TPU VM software versions by accelerator family (gcloud --version).
RUNTIME_VERSIONS = (
    ("v6e", "v2-alpha-tpuv6e"),
    ("v5p", "v2-alpha-tpuv5"),
    ("v5litepod", "v2-alpha-tpuv5-lite"),
    ("v5e", "v2-alpha-tpuv5-lite"),
    ("v4", "tpu-ubuntu2204-base"),
)
REMOTE_DIR = "~/infstar-jax"
ARCHIVE = "infstar-jax.tar.gz"


def runtime_version(accelerator: str) -> str:
    for prefix, version in RUNTIME_VERSIONS:
        if accelerator.startswith(prefix):
            return version
    raise SystemExit(f"no default TPU runtime for accelerator {accelerator!r}; pass --version")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python launch/tpu.py", description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="TPU VM name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", help="GCP project (default: gcloud's)")
    p.add_argument("--accelerator", default="v5p-8", help="accelerator type, e.g. v5p-64, v6e-256 (default v5p-8)")
    p.add_argument("--version", help="TPU VM runtime version (default: by accelerator family)")
    p.add_argument("--spot", action="store_true", help="create the slice on spot capacity")
    p.add_argument("--reuse", action="store_true", help="the slice exists: do not describe/create it")
    p.add_argument("--skip-install", action="store_true", help="the code is already installed on the workers")
    p.add_argument("--detach", action="store_true", help="run under nohup and return (log: ~/infstar-train.log)")
    p.add_argument("--skip-aot", action="store_true", help="skip the compiled-ahead check of the train step")
    p.add_argument("--exclude", action="append", default=[], help="tar --exclude pattern for packaging (repeatable)")
    common.add_train_arguments(p)
    return p


def gcloud(args, *verb: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", *verb, f"--zone={args.zone}"]
    if args.project:
        cmd.append(f"--project={args.project}")
    return cmd


def main(argv=None) -> int:
    args = common.parse(parser(), argv)
    sh = common.Shell(args.dry_run)
    if not args.skip_aot:
        common.aot_check(sh, args, args.accelerator)
    if not args.reuse:
        exists = sh.run(gcloud(args, "describe", args.name) + ["--format=value(state)"], check=False, quiet=True,
                        note="does the slice exist?")
        if exists != 0 or args.dry_run:
            version = args.version or runtime_version(args.accelerator)
            create = gcloud(args, "create", args.name) + [f"--accelerator-type={args.accelerator}",
                                                          f"--version={version}"]
            if args.spot:
                create.append("--spot")
            sh.run(create, note="only if it does not exist" if args.dry_run else "")
    if not args.skip_install:
        archive = str(Path(tempfile.gettempdir()) / f"{args.name}-{ARCHIVE}")
        sh.run(common.package_command(archive, args.exclude))
        sh.run(gcloud(args, "scp", archive, f"{args.name}:{ARCHIVE}") + ["--worker=all"])
        install = (f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && tar -xzf {ARCHIVE} -C {REMOTE_DIR} && "
                   f"cd {REMOTE_DIR} && pip install -q -U 'jax[tpu]' && pip install -q -e '.[video,text]'")
        sh.run(gcloud(args, "ssh", args.name) + ["--worker=all", f"--command={install}"])
    train = common.remote_shell(common.train_command(args, "python3", ["--multihost"]), args.env_vars, REMOTE_DIR)
    if args.detach:
        train = f"nohup bash -c {common.shlex.quote(train)} > ~/infstar-train.log 2>&1 &"
    return sh.run(gcloud(args, "ssh", args.name) + ["--worker=all", f"--command={train}"], check=False)


if __name__ == "__main__":
    sys.exit(main())
