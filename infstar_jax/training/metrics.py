"""Training metrics: model FLOPs and MFU, per-scale-group loss/accuracy, windowed averages, and the writers.

MFU (issue 7): ``(6 · params · tokens + 12 · (nonzero 128×128 mask tiles · 128²) · width · depth) / step time /
peak``, with ``params`` = all transformer parameters (``TransformerConfig.num_params``), ``tokens`` = the packed
sequence length (visual + text tokens padded to a multiple of 128, as the reference packs them: a row's FLOPs are
counted with its caption's real length, not our bucketed text slot), ``width = heads · head_dim``, recomputation
(remat) not counted, and ``peak`` = the chip's dense bf16 peak (H100/H200: 989 TFLOP/s). With 256 text tokens this
reproduces the reference trainer's MFU column of the issue to three digits.

Writers (process 0 only): JSON lines in ``WORKDIR/metrics.jsonl`` (chunks under ``WORKDIR/metrics/`` for gs:// and
other object-store workdirs; ``read_metrics`` reads either), TensorBoard event files under ``WORKDIR/tensorboard``
when ``tensorboardX`` is installed (it is not a dependency).
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from etils import epath

from infstar_jax.training import packing as packing_lib
from infstar_jax.transformer.attention import BlockLayout
from infstar_jax.transformer.config import TransformerConfig

log = logging.getLogger(__name__)

TILE = 128
METRICS_FILE = "metrics.jsonl"
METRICS_DIR = "metrics"

# Dense bf16 peak FLOP/s per chip, matched against ``jax.Device.device_kind`` (lower case, first match wins).
PEAK_FLOPS = (
    ("h200", 989e12),
    ("h100", 989e12),
    ("gh200", 989e12),
    ("a100", 312e12),
    ("tpu v6", 918e12),
    ("tpu v5p", 459e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v4", 275e12),
)


def peak_flops(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s of one device, or ``None`` if unknown (CPU): MFU is then not reported."""
    kind = device_kind.lower()
    for name, flops in PEAK_FLOPS:
        if name in kind:
            return flops
    return None


def nonzero_tiles(layout: BlockLayout, tile: int = TILE) -> int:
    """Number of ``tile × tile`` tiles of the ``[L, L]`` attention mask holding at least one visible pair."""
    n = -(-layout.length // tile)
    tiles = np.zeros((n, n), bool)
    offs, lens = layout.offsets, layout.lengths
    for i, row in enumerate(layout.sees):
        if not lens[i]:
            continue
        q0, q1 = offs[i] // tile, (offs[i] + lens[i] - 1) // tile + 1
        for j in row:
            if lens[j]:
                tiles[q0:q1, offs[j] // tile: (offs[j] + lens[j] - 1) // tile + 1] = True
    return int(tiles.sum())


@functools.lru_cache(maxsize=4096)
def row_flops(cfg: TransformerConfig, example: packing_lib.ExampleSpec, pad_to_multiple: int = TILE
              ) -> tuple[int, float]:
    """``(tokens, flops)`` of one packed example trained for one step (forward + backward, no recompute)."""
    pk = packing_lib.pack([example], pad_to_multiple)
    width = cfg.num_heads * cfg.head_dim
    flops = 6.0 * cfg.num_params() * pk.length + 12.0 * nonzero_tiles(pk.layout) * TILE**2 * width * cfg.depth
    return pk.length, flops


def batch_flops(cfg: TransformerConfig, shape, text_lens: Sequence[int]) -> tuple[int, float]:
    """``(tokens, flops)`` of a global batch: the sum over its real rows (``text_lens``: their caption lengths)."""
    tokens, flops = 0, 0.0
    for n in text_lens:
        t, f = row_flops(cfg, shape.example(int(n)), shape.pad_to_multiple)
        tokens += t
        flops += f
    return tokens, flops


# ---- per-scale groups ------------------------------------------------------------------------------------------


def block_groups(pk: packing_lib.Packing, scales_per_clip: int) -> list[str]:
    """Group of each visual block: ``image_semantic``, ``image_detail``, ``video_semantic``, ``video_detail``
    (clip 0 is the image pyramid; the head decides semantic/detail)."""
    return [f"{'image' if b.si < scales_per_clip else 'video'}_{'detail' if b.detail else 'semantic'}"
            for b in pk.visual]


def scale_metrics(block_loss: np.ndarray, block_acc: np.ndarray, shape) -> dict[str, tuple[float, float]]:
    """Per-scale and per-group loss/accuracy of one step as ``{name: (value, weight)}`` for ``WindowMean``.

    Scales are named by their index in the full schedule (``loss/s07``); groups average their scales' token-level
    values (weight = tokens).
    """
    pk = shape.packing
    out: dict[str, tuple[float, float]] = {}
    sums: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0.0])
    for b, g, l, a in zip(pk.visual, block_groups(pk, shape.scales_per_clip), block_loss, block_acc):
        tokens = float(np.prod(b.shape))
        out[f"loss/s{b.si:02d}"] = (float(l), 1.0)
        out[f"acc/s{b.si:02d}"] = (float(a), 1.0)
        s = sums[g]
        s[0] += float(l) * tokens
        s[1] += float(a) * tokens
        s[2] += tokens
    for g, (l, a, n) in sums.items():
        out[f"loss/{g}"] = (l / n, n)
        out[f"acc/{g}"] = (a / n, n)
    return out


class WindowMean:
    """Weighted means of named values over a logging window."""

    def __init__(self):
        self._sum: dict[str, float] = collections.defaultdict(float)
        self._weight: dict[str, float] = collections.defaultdict(float)

    def add(self, values: Mapping[str, tuple[float, float] | float]) -> None:
        for k, v in values.items():
            value, weight = v if isinstance(v, tuple) else (v, 1.0)
            if weight > 0 and math.isfinite(value):
                self._sum[k] += value * weight
                self._weight[k] += weight
            elif not math.isfinite(value):
                self._sum[k] = float("nan")
                self._weight[k] = max(self._weight[k], 1.0)

    def result(self) -> dict[str, float]:
        return {k: self._sum[k] / self._weight[k] for k in sorted(self._sum) if self._weight[k] > 0}

    def __len__(self) -> int:
        return len(self._sum)


# ---- writers ---------------------------------------------------------------------------------------------------


class MetricWriter:
    """Writes ``{"step": s, **metrics}`` records as JSON lines and, if available, TensorBoard scalars under
    ``WORKDIR/tensorboard``. Inactive (writes nothing) on processes other than 0.

    A local workdir gets one append-only ``WORKDIR/metrics.jsonl``. Object stores (a ``gs://`` workdir, any
    ``etils.epath`` URL) cannot append, so there records go to chunk files under ``WORKDIR/metrics/`` named by the
    writer's session (0 for a fresh run, +1 at every resume) and their first step (``0001-000000016.jsonl``), at
    most ``chunk_records`` records each, rewritten whole (write + rename) at every write. ``read_metrics`` reads
    either.
    """

    def __init__(self, workdir: str, *, active: bool = True, tensorboard: bool = True, chunked: bool | None = None,
                 chunk_records: int = 500):
        self.active = active
        self.chunked = "://" in os.fspath(workdir) if chunked is None else chunked
        self.chunk_records = int(chunk_records)
        self._dir = epath.Path(workdir) / METRICS_DIR
        self._file = None
        self._chunk: epath.Path | None = None
        self._lines: list[str] = []
        self._tb = None
        if not active:
            return
        if self.chunked:
            self._dir.mkdir(parents=True, exist_ok=True)
            sessions = [int(p.name.split("-")[0]) for p in self._dir.glob("*-*.jsonl")]
            self._session = max(sessions) + 1 if sessions else 0
        else:
            os.makedirs(workdir, exist_ok=True)
            self._file = open(os.path.join(workdir, METRICS_FILE), "a")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                log.info("tensorboardX is not installed: metrics go to %s only", workdir)
            else:
                self._tb = SummaryWriter(os.fspath(epath.Path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.active:
            return
        clean = {k: (float(v) if isinstance(v, (int, float, np.number)) else v) for k, v in metrics.items()
                 if k != "step"}
        line = json.dumps({"step": int(step), **clean}, allow_nan=True)
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()
        else:
            if self._chunk is None or len(self._lines) >= self.chunk_records:
                self._chunk, self._lines = self._dir / f"{self._session:04d}-{int(step):09d}.jsonl", []
            self._lines.append(line)
            tmp = self._chunk.parent / f".{self._chunk.name}.tmp"
            tmp.write_text("\n".join(self._lines) + "\n")
            tmp.replace(self._chunk)  # readers never see a partial chunk
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(workdir: str) -> list[dict]:
    """All records of a run, one per step in step order; where a resumed run re-logged a step, the later record
    wins (``metrics.jsonl`` in line order, chunks in (session, first step) order). A line cut by a killed process
    is skipped."""
    root = epath.Path(workdir)
    sources = [root / METRICS_FILE] if (root / METRICS_FILE).exists() else []
    sources += sorted((root / METRICS_DIR).glob("*-*.jsonl")) if (root / METRICS_DIR).exists() else []
    by_step: dict[int, dict] = {}
    for src in sources:
        for line in src.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            by_step[rec["step"]] = rec
    return [by_step[k] for k in sorted(by_step)]
