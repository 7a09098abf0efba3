"""``python -m infstar_jax.train --config configs/X.py --workdir DIR``: train (or resume training) a model.

    python -m infstar_jax.train --config configs/toy.py --workdir runs/toy --config.data.cache=toy_cache
    python -m infstar_jax.train --config configs/toy.py --workdir runs/toy --config.train.steps=200 \\
        --config.train.lr=3e-4 --config.mesh.shape.fsdp=-1

Any config key can be overridden (``--config.SECTION.KEY=VALUE``); the config file must define the training
sections (``infstar_jax.training.tasks.add_training_config``). ``--workdir`` receives the checkpoints, the resolved
config (``config.json``), metrics (``metrics.jsonl``, TensorBoard if ``tensorboardX`` is installed), the data index
and, at the end, the exported weights (``export/``). Re-running the same command resumes from the last checkpoint.

Multi-host: ``--multihost`` calls ``jax.distributed.initialize()`` first (TPU pods detect everything themselves; on
GPU clusters give ``--coordinator_address``, ``--num_processes`` and ``--process_id``, or set them through the
environment variables jax understands). The launchers in ``launch/`` pass these flags.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, exports)")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "initialise jax.distributed before anything else")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host GPU)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (multi-host GPU)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (multi-host GPU)")
flags.mark_flags_as_required(["workdir"])


def split_config_file(argv: list[str]) -> tuple[str | None, list[str]]:
    """``(CONFIG_FILE[:ARG], argv without --config FILE)``; ``--config.KEY=VALUE`` overrides stay in argv."""
    path, rest, i = None, [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            path, i = argv[i + 1], i + 2
            continue
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return path, rest


def load_config(path: str):
    """``get_config(ARG)`` of ``FILE[:ARG]`` with the training sections completed (``tasks.add_training_config``),
    so that every training key can be overridden even when the preset does not name it."""
    from infstar_jax.training import tasks

    file, _, arg = path.partition(":")
    if not os.path.isfile(file):
        raise SystemExit(f"config file {file!r} does not exist (expected e.g. configs/toy.py or configs/arch.py:NAME)")
    name = "infstar_config_" + os.path.splitext(os.path.basename(file))[0]
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise SystemExit(f"config file {file} defines no get_config()")
    config = module.get_config(arg) if arg else module.get_config()
    return tasks.add_training_config(config)


def initialize_distributed(multihost: bool, coordinator: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
    """``jax.distributed.initialize`` when asked (``--multihost``) or when a coordinator is given."""
    if not (multihost or coordinator):
        return
    import jax

    kwargs = {k: v for k, v in dict(coordinator_address=coordinator, num_processes=num_processes,
                                    process_id=process_id).items() if v is not None}
    jax.distributed.initialize(**kwargs)


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    initialize_distributed(_MULTIHOST.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from infstar_jax.training import loop

    summary = loop.run(flags.FLAGS.config, _WORKDIR.value)
    logging.getLogger("infstar_jax.train").info(
        "finished at step %d%s", summary["step"],
        f"; weights exported to {summary['export']}" if "export" in summary else "")
    return 0


def cli(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    path, rest = split_config_file(argv)
    if path is None:
        raise SystemExit("usage: python -m infstar_jax.train --config configs/X.py[:ARG] --workdir DIR "
                         "[--config.SECTION.KEY=VALUE ...]")
    config_flags.DEFINE_config_dict("config", load_config(path), "the run config (overridable: --config.KEY=VALUE)",
                                    sys_argv=rest)
    app.run(main, argv=rest)


if __name__ == "__main__":
    cli()
