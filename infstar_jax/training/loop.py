"""The training loop shared by every task (``tasks.py``): checkpoints, resume, preemption, metrics, progress.

``run(config, workdir)``:

1. builds the mesh (``config.mesh``) and enters it, creates the task (``config.task``);
2. opens an orbax ``CheckpointManager`` at ``WORKDIR/checkpoints`` (async saves every ``checkpoint.every_steps``,
   ``max_to_keep`` newest kept, plus every ``keep_period``-th). Each checkpoint holds three items: ``state`` (params,
   optimizer state, EMA, step: plain nested dicts), ``data`` (the grain iterator state, one JSON per process) and
   ``config`` (the resolved config);
3. resumes from the latest checkpoint if there is one, restoring the state onto the *current* mesh (any device
   count or mesh shape: the restore target carries the current shardings) and the data iterator to the next batch,
   so the run continues with the same data order and random draws; else initialises (scratch or ``train.init_from``);
4. runs ``train.steps`` steps. SIGTERM (preemption; on multi-host the coordination service's preemption sync point)
   finishes the current step, saves, and returns; a SIGKILL loses at most the steps since the last save;
5. logs on process 0 every ``log.every_steps``: the task's metrics averaged over the window (loss, accuracy per
   scale and scale group, grad norm, lr), step time, data wait, tokens/s, MFU (when the chip's peak is known),
   compile time of new step shapes, and skipped-sample counts (process 0's by reason, and the total over all
   processes); to the console (tqdm bar + log lines),
   ``WORKDIR/metrics.jsonl`` (chunks under ``WORKDIR/metrics/`` on object stores) and TensorBoard (if
   ``tensorboardX`` is installed);
6. at the end waits for pending saves and exports the weights (``WORKDIR/export``, ``train.export``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from infstar_jax import parallel
from infstar_jax.training import metrics as metrics_lib, state as state_lib, tasks

log = logging.getLogger(__name__)


class _Preemption:
    """SIGTERM sets a flag that the loop checks after every step (single process); restored on exit."""

    def __init__(self):
        self.flag = threading.Event()
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def _handler(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint after the current step")
        self.flag.set()

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def reached(self, manager: ocp.CheckpointManager, step: int) -> bool:
        if jax.process_count() > 1:
            # Every process must stop at the same step: the coordination service agrees on it.
            return manager.reached_preemption(step)
        return self.flag.is_set()


def checkpoint_manager(directory: str, c) -> ocp.CheckpointManager:
    """The orbax manager for ``directory`` with the config's ``checkpoint`` section."""
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=int(c.every_steps), max_to_keep=int(c.max_to_keep) or None,
        keep_period=int(c.keep_period) or None, enable_async_checkpointing=bool(c.async_save), create=True)
    return ocp.CheckpointManager(epath.Path(directory), options=options, item_names=("state", "data", "config"))


def save(manager: ocp.CheckpointManager, step: int, state, iterator, config, *, force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state_lib.state_dict(state)),
                              data=grain.checkpoint.CheckpointSave(iterator),
                              config=ocp.args.JsonSave(config.to_dict()))
    return manager.save(step, args=args, force=force)


def _restore_data(manager: ocp.CheckpointManager, step: int, iterator) -> None:
    try:
        manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(iterator)))
    except ValueError:
        # Saved with another process count: the batch plan is global, so any process's position serves (skip
        # counts restart from that process's).
        files = sorted((epath.Path(manager.directory) / str(step) / "data").glob("process_*.json"))
        if not files:
            raise
        log.warning("data state saved by %d processes, running with %d: resuming from %s", len(files),
                    jax.process_count(), files[0].name)
        iterator.set_state(json.loads(files[0].read_text()))


def restore(manager: ocp.CheckpointManager, step: int, task: tasks.Task, iterator):
    """The state of checkpoint ``step`` on the current mesh, and ``iterator`` moved to its data position."""
    abstract = task.abstract_state()
    target = state_lib.state_dict(abstract)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    _restore_data(manager, step, iterator)
    return state_lib.from_state_dict(abstract, restored.state)


def _setup_logging():
    level = logging.INFO if jax.process_index() == 0 else logging.WARNING
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root.setLevel(level)
    logging.getLogger("absl").setLevel(logging.WARNING)


def _write_json(path: str, obj) -> None:
    p = epath.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))


def _format(summary: dict[str, float], keys=("loss", "acc", "grad_norm", "step_time", "tokens_per_s", "mfu")) -> str:
    parts = []
    for k in keys:
        if k in summary:
            v = summary[k]
            parts.append(f"{k} {v:.4g}" if k != "mfu" else f"mfu {100 * v:.1f}%")
    return ", ".join(parts)


def scale_table(summary: dict[str, float]) -> str:
    """Per-scale and per-group accuracy/loss of a summary as a small text table."""
    names = sorted({k.split("/", 1)[1] for k in summary if k.startswith("acc/")})
    if not names:
        return ""
    rows = [f"{'scale':>16} {'acc':>8} {'loss':>8}"]
    for n in names:
        acc, loss = summary.get("acc/" + n, float("nan")), summary.get("loss/" + n, float("nan"))
        rows.append(f"{n:>16} {acc:8.4f} {loss:8.4f}")
    return "\n".join(rows)


def run(config, workdir: str) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the last logged summary with
    ``step`` and, if written, ``export`` (the exported weights' folder)."""
    _setup_logging()
    config = tasks.add_training_config(config)
    workdir = os.fspath(workdir)
    main = jax.process_index() == 0
    mesh = parallel.make_mesh(dict(config.mesh.shape))
    with jax.set_mesh(mesh):
        task = tasks.create(config, mesh, workdir)
        log.info("%s on %d devices (%d processes), mesh %s", task.describe(), jax.device_count(),
                 jax.process_count(), dict(mesh.shape))
        manager = checkpoint_manager(os.path.join(workdir, "checkpoints"), config.checkpoint)
        iterator = task.data()
        latest = manager.latest_step()
        if latest is not None:
            log.info("resuming from checkpoint %d in %s", latest, workdir)
            state = restore(manager, latest, task, iterator)
        else:
            state = task.init_state()
        if main:
            _write_json(os.path.join(workdir, "config.json"), config.to_dict())
            shapes = task.possible_shapes()
            if shapes is not None:
                _write_json(os.path.join(workdir, "step_shapes.json"), [s.to_json() for s in shapes])
                log.info("%d possible step shapes (compiled variants):\n  %s", len(shapes),
                         "\n  ".join(s.describe() for s in shapes))
        try:
            with _Preemption() as preemption:
                summary = _train(config, workdir, task, manager, state, iterator, preemption, main)
        finally:
            manager.wait_until_finished()
            manager.close()
    return summary


def _train(config, workdir, task, manager, state, iterator, preemption, main) -> dict[str, Any]:
    from tqdm import tqdm

    total = int(config.train.steps)
    log_every = max(1, int(config.log.every_steps))
    start = int(jax.device_get(state.step))
    writer = metrics_lib.MetricWriter(workdir, active=main, tensorboard=bool(config.log.tensorboard))
    peak = float(config.train.peak_tflops) * 1e12 or metrics_lib.peak_flops(jax.devices()[0].device_kind)
    bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
               disable=not (main and config.log.progress))
    seen_shapes: set = set()
    pending: list = []
    window = metrics_lib.WindowMean()
    timing = dict(steps=0, time=0.0, wait=0.0, tokens=0, flops=0.0, compile=0.0)
    t_mark = time.perf_counter()
    summary: dict[str, Any] = {"step": start}
    step = start
    stopped = False
    try:
        while step < total:
            t0 = time.perf_counter()
            batch = next(iterator)
            timing["wait"] += time.perf_counter() - t0
            stats = task.batch_stats(batch)
            new_shape = stats.get("shape") not in seen_shapes
            if new_shape:
                # Compilation of a new step variant: time it apart (block), keep it out of the step-time window.
                jax.block_until_ready(state)
                t_c = time.perf_counter()
                timing["time"] += t_c - t_mark
            state, m = task.step(state, batch)
            step += 1
            if new_shape:
                jax.block_until_ready(m)
                elapsed = time.perf_counter() - t_c
                seen_shapes.add(stats.get("shape"))
                timing["compile"] += elapsed
                log.info("step %d: compiled a new step shape in %.1f s (%d so far)", step, elapsed, len(seen_shapes))
                t_mark = time.perf_counter()
            else:
                timing["steps"] += 1
                timing["tokens"] += stats["tokens"]
                timing["flops"] += stats["flops"]
            pending.append((batch, m))
            bar.update(1)
            preempted = preemption.reached(manager, step)
            if step % log_every == 0 or step == total or preempted:
                summary = _flush(task, pending, window, timing, t_mark, peak, iterator)
                pending, window = [], metrics_lib.WindowMean()
                timing = dict(steps=0, time=0.0, wait=0.0, tokens=0, flops=0.0, compile=0.0)
                t_mark = time.perf_counter()
                writer.write(step, summary)
                bar.set_postfix_str(_format(summary, ("loss", "acc", "tokens_per_s")))
                log.info("step %d/%d: %s", step, total, _format(summary))
            save(manager, step, state, iterator, config, force=preempted or step == total)
            if preempted:
                log.warning("preempted: checkpoint %d saved; exiting", step)
                stopped = True
                break
    finally:
        bar.close()
        writer.close()
    summary = dict(summary, step=step)
    if not stopped and step >= total:
        manager.wait_until_finished()
        if config.train.export:
            out = task.export(state, os.path.join(workdir, "export"))
            if out:
                summary["export"] = out
                log.info("exported the trained weights to %s", out)
        table = scale_table(summary)
        if table and main:
            log.info("final per-scale metrics (last %d steps):\n%s", log_every, table)
    return summary


def _flush(task, pending, window, timing, t_mark, peak, iterator) -> dict[str, Any]:
    """Fetches the window's device metrics (this waits for its steps), returns the window summary."""
    host = jax.device_get([m for _, m in pending])
    for (batch, _), m in zip(pending, host):
        window.add(task.step_metrics(batch, {k: np.asarray(v) for k, v in m.items()}))
    elapsed = timing["time"] + time.perf_counter() - t_mark
    out: dict[str, Any] = window.result()
    n = timing["steps"]
    if n:
        out["step_time"] = elapsed / n
        out["data_wait"] = timing["wait"] / max(elapsed, 1e-9)
        if timing["tokens"]:
            out["tokens_per_s"] = timing["tokens"] / elapsed
        if timing["flops"] and peak:
            out["mfu"] = timing["flops"] / elapsed / (peak * jax.device_count())
    if timing["compile"]:
        out["compile_time"] = timing["compile"]
    skipped = getattr(iterator, "skipped", None)
    if skipped is not None:
        counts = skipped.metrics()
        out.update({k: float(v) for k, v in counts.items()})  # this process's shard, by reason
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            totals = multihost_utils.process_allgather(np.asarray([counts.get("data/skipped", 0)], np.int64))
            out["data/skipped_all_processes"] = float(np.sum(totals))
    return out
