"""Shared pieces of the launchers: the command runner (with ``--dry-run``), the train command, code packaging.

Launchers never import jax: they only build and run shell commands. Every command is printed (``+ cmd``) before it
runs; with ``--dry-run`` nothing runs and each command is printed once, in order, except the TPU launcher's
compiled-ahead check (``aot_check``), which creates nothing and runs here in a dry run too: its table and verdict are
printed as ``#`` lines.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE_EXCLUDES = (".git", "__pycache__", "*.egg-info", ".pytest_cache", "*.pyc")


class Shell:
    """Prints and runs commands; with ``dry_run`` only prints them."""

    def __init__(self, dry_run: bool, out=None):
        self.dry_run = dry_run
        self.out = out or sys.stdout

    def show(self, cmd: Sequence[str], env: Mapping[str, str] | None = None, note: str = "") -> None:
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
        line = f"+ {prefix + ' ' if prefix else ''}{shlex.join(cmd)}"
        print(line + (f"    # {note}" if note else ""), file=self.out, flush=True)

    def run(self, cmd: Sequence[str], *, env: Mapping[str, str] | None = None, check: bool = True,
            note: str = "", quiet: bool = False) -> int:
        """Runs ``cmd`` (extra ``env`` on top of ours); returns its exit code (0 in a dry run)."""
        self.show(cmd, env, note)
        if self.dry_run:
            return 0
        full = dict(os.environ, **(env or {}))
        kwargs = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) if quiet else {}
        rc = subprocess.run(list(cmd), env=full, **kwargs).returncode
        if check and rc:
            raise SystemExit(f"command failed with exit code {rc}: {shlex.join(cmd)}")
        return rc

    def start(self, cmd: Sequence[str], *, env: Mapping[str, str] | None = None, note: str = ""):
        """Starts ``cmd`` in the background; ``None`` in a dry run."""
        self.show(cmd, env, note)
        if self.dry_run:
            return None
        return subprocess.Popen(list(cmd), env=dict(os.environ, **(env or {})))


def wait_all(procs) -> int:
    """Waits for background processes; if one fails, terminates the others. Returns the first non-zero exit code."""
    procs = [p for p in procs if p is not None]
    rc = 0
    try:
        for p in procs:
            code = p.wait()
            if code and not rc:
                rc = code
                for q in procs:
                    if q.poll() is None:
                        q.terminate()
    except KeyboardInterrupt:
        for q in procs:
            if q.poll() is None:
                q.terminate()
        raise
    return rc


def aot_command(args, topology: str, python: str = sys.executable) -> list[str]:
    """``python -m infstar_jax.aot``: the train step compiled ahead of time for ``topology`` with the run's config and
    overrides (the trainer's ``--config.KEY=VALUE`` form, which the AOT tool accepts)."""
    return [python, "-m", "infstar_jax.aot", "--config", args.config, "--topology", topology, "--what", "train",
            *args.overrides]


def aot_check(sh: Shell, args, topology: str) -> None:
    """Compiles the train step for the requested slice on this machine before anything is created (also in a dry
    run: it only needs libtpu here, no TPU) and prints its table and verdict as ``#`` lines. Stops the launch when the
    step does not fit a chip's memory or does not compile; ``--skip-aot`` skips the check."""
    cmd = aot_command(args, topology)
    sh.show(cmd, note="compiled-ahead check for the slice (runs here, also in a dry run)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        print(f"# {line}", file=sh.out, flush=True)
    if proc.returncode == 0:
        print(f"# aot verdict: the train step compiles for {topology} and fits each chip's memory", file=sh.out,
              flush=True)
        return
    if proc.returncode == 3:
        raise SystemExit(f"aot verdict: the train step does not fit {topology} (or did not compile; table above). Use "
                         "a larger slice, another mesh (--config.mesh.shape...), a smaller batch or more remat; "
                         "--skip-aot launches anyway")
    tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
    raise SystemExit(f"the compiled-ahead check failed (exit code {proc.returncode}):\n{tail}\n"
                     "fix the configuration, or pass --skip-aot to launch without the check")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="config file, e.g. configs/toy.py (relative to the repository)")
    p.add_argument("--workdir", required=True, help="run directory (a gs:// URL on pods)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the training processes (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print every command instead of running it")


def parse(p: argparse.ArgumentParser, argv=None):
    """Launcher arguments, plus the ``--config.KEY=VALUE`` overrides forwarded to the trainer."""
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)} (config overrides look like --config.train.lr=1e-4)")
    args.overrides = rest
    args.env_vars = parse_env(args.env, p)
    return args


def parse_env(items: Sequence[str], p: argparse.ArgumentParser | None = None) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            msg = f"--env expects KEY=VALUE, got {item!r}"
            if p is not None:
                p.error(msg)
            raise ValueError(msg)
        out[key] = value
    return out


def train_command(args, python: str = "python", extra: Sequence[str] = ()) -> list[str]:
    """``python -m infstar_jax.train --config C --workdir W [extra] [overrides]``."""
    return [python, "-m", "infstar_jax.train", "--config", args.config, "--workdir", args.workdir, *extra,
            *args.overrides]


def remote_shell(cmd: Sequence[str], env: Mapping[str, str], cwd: str) -> str:
    """One shell string ``cd CWD && K=V ... cmd`` for ssh."""
    assigns = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    return f"cd {cwd} && {assigns + ' ' if assigns else ''}{shlex.join(cmd)}"


def package_command(archive: str, excludes: Sequence[str] = ()) -> list[str]:
    """``tar`` of the working tree (uncommitted changes included) without VCS and cache files."""
    ex = [f"--exclude={e}" for e in (*PACKAGE_EXCLUDES, *excludes)]
    return ["tar", "-czf", archive, *ex, "-C", str(REPO), "."]
