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

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py[:arg])",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, exports)")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "initialise jax.distributed before anything else")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host GPU)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (multi-host GPU)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (multi-host GPU)")
flags.mark_flags_as_required(["config", "workdir"])


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

    summary = loop.run(_CONFIG.value, _WORKDIR.value)
    log = logging.getLogger("infstar_jax.train")
    log.info("finished at step %d%s", summary["step"],
             f"; weights exported to {summary['export']}" if "export" in summary else "")
    return 0


def cli() -> None:
    app.run(main)


if __name__ == "__main__":
    sys.exit(cli())
