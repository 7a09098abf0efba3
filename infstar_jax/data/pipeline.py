"""grain input pipelines: raw videos or the token cache -> per-process shard -> shuffle -> decode -> counted skips ->
batches, with a checkpointable iterator, and global batches for a mesh.

Order of a pipeline (``grain`` Dataset API)::

    MapDataset.source(samples)[process_index::process_count] .shuffle(seed) .repeat(num_epochs)
      .random_map(decode)                 # returns a `Skipped` record instead of raising
      .to_iter_dataset(ReadOptions(...))  # decode in threads, order preserved
      -> SkipFailuresIterDataset          # drops `Skipped`, counts it by reason, logs it
      .batch(batch_size)

Failures never stop a run and never disappear silently: every dropped sample is counted in the pipeline's
``SkipCounter`` (``pipeline.skipped``, reported by the trainer through ``metrics()``), and the counts are part of the
iterator state, so a resumed run keeps counting from where it stopped. ``iterator.get_state()`` /
``iterator.set_state(state)`` (JSON-serialisable dicts) resume the exact data order: shuffling is per epoch by index
(``grain``'s index shuffle) and every random choice of the caption rule comes from a generator seeded by
``(seed, process, element index)``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding

from infstar_jax import parallel, schedules
from infstar_jax.data import metadata as md
from infstar_jax.data import video as vid
from infstar_jax.text import prompts

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """The pipeline cannot produce data at all (e.g. every sample of a shard fails)."""


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Returned by a decode step in place of a sample it could not produce."""

    reason: str
    origin: str
    message: str


class SkipCounter:
    """Thread-safe counts of dropped samples by reason (``missing``, ``unreadable``, ``truncated``, ``too_short``,
    ``error`` ...). Metadata-level drops can be included as initial counts."""

    def __init__(self, initial: Mapping[str, int] | None = None):
        self._lock = threading.Lock()
        self._counts: collections.Counter = collections.Counter(dict(initial or {}))

    def add(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self._counts[reason] += n

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {k: int(v) for k, v in sorted(self._counts.items()) if v}

    @property
    def total(self) -> int:
        return sum(self.counts().values())

    def restore(self, counts: Mapping[str, int]) -> None:
        with self._lock:
            self._counts = collections.Counter({str(k): int(v) for k, v in counts.items()})

    def metrics(self, prefix: str = "data/skipped") -> dict[str, int]:
        """``{prefix: total, prefix/reason: n, ...}`` for the trainer's metrics."""
        counts = self.counts()
        return {prefix: sum(counts.values()), **{f"{prefix}/{k}": v for k, v in counts.items()}}

    def __repr__(self) -> str:
        return f"SkipCounter({self.counts()})"


class _SkipFailuresIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, counter: SkipCounter, max_consecutive: int):
        super().__init__(parent)
        self._counter = counter
        self._max_consecutive = max_consecutive

    def __next__(self):
        consecutive = 0
        while True:
            element = next(self._parent)
            if not isinstance(element, Skipped):
                return element
            self._counter.add(element.reason)
            log.warning("skipped sample %s (%s): %s", element.origin, element.reason, element.message)
            consecutive += 1
            if consecutive >= self._max_consecutive:
                raise DataError(
                    f"{consecutive} samples in a row could not be used (every sample of this shard fails); skipped: "
                    f"{self._counter.counts()}. Check the data paths and the metadata.")

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "skipped": self._counter.counts()}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._counter.restore(state["skipped"])


class SkipFailuresIterDataset(grain.IterDataset):
    """Drops ``Skipped`` elements, counting each in ``counter`` (its counts travel in the iterator state)."""

    def __init__(self, parent: grain.IterDataset, counter: SkipCounter, max_consecutive: int):
        super().__init__(parent)
        self._counter = counter
        self._max_consecutive = max(1, int(max_consecutive))

    def __iter__(self) -> _SkipFailuresIterator:
        return _SkipFailuresIterator(self._parent.__iter__(), self._counter, self._max_consecutive)


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """Options shared by the raw-video and the token-cache pipelines.

    pn: pixel level ("0.40M") or number of scales; fixes the frame size with each video's h/w template.
    spatial_stride: the tokenizer's pixels per latent position (16 for the release's VAE).
    rule: duration mapping (training: 1 s resolution, 81 frames at 16 fps).
    short_prob / dynamic_length / append_duration: the caption rule (SPEC §7.1).
    seed: shuffling and caption randomness. shuffle: shuffle each epoch. num_epochs: ``None`` = repeat forever
      (shards may then differ by one sample); a number of epochs cuts the data to equal shards (cut counted).
    batch_size / drop_remainder: per-process batches (the release trains one sample per batch).
    num_threads / prefetch: decode threads and prefetched elements (decoded videos are large: keep this small).
    """

    pn: int | str = "0.40M"
    spatial_stride: int = schedules.SPATIAL_STRIDE
    rule: md.DurationRule = md.DurationRule()
    short_prob: float = prompts.DEFAULT_SHORT_PROB
    dynamic_length: bool = True
    append_duration: bool = True
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    batch_size: int = 1
    drop_remainder: bool = True
    num_threads: int = 2
    prefetch: int = 4


@dataclasses.dataclass
class Pipeline:
    """A grain ``IterDataset`` of batches and the ``SkipCounter`` it reports to. Make one iterator per pipeline."""

    dataset: grain.IterDataset
    skipped: SkipCounter
    num_samples: int

    def __iter__(self) -> grain.DatasetIterator:
        return iter(self.dataset)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else int(process_index)
    count = jax.process_count() if process_count is None else int(process_count)
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"process_index must be in [0, process_count), got {index} of {count}")
    return index, count


def shard(ds: grain.MapDataset, process_index: int, process_count: int,
          drop_remainder: bool = True) -> grain.MapDataset:
    """Elements ``process_index::process_count`` of ``ds``; with ``drop_remainder`` first cut ``ds`` to a multiple
    of ``process_count`` so every process sees the same number of samples per epoch."""
    n = len(ds)
    if drop_remainder:
        ds = ds[: n - n % process_count]
    out = ds[process_index::process_count]
    if len(out) == 0:
        raise ValueError(f"{n} samples cannot be sharded over {process_count} processes (process {process_index} "
                         "gets none)")
    return out


def _seed(seed: int, process_index: int, stream: int) -> int:
    return int(np.random.SeedSequence([int(seed) % 2**32, process_index, stream]).generate_state(1)[0])


def stack_batch(elements: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Stacks per-sample dicts into a batch.

    Arrays must have equal shapes, except ``text [len, D]`` which is right-padded with zeros to the longest in the
    batch (``text_len [B] int32`` gives the lengths); strings become a ``[B]`` unicode array.
    """
    out: dict[str, np.ndarray] = {}
    for key in elements[0]:
        values = [e[key] for e in elements]
        if isinstance(values[0], str):
            out[key] = np.asarray(values)
        elif key == "text":
            lens = np.asarray([v.shape[0] for v in values], np.int32)
            padded = np.zeros((len(values), int(lens.max()), values[0].shape[1]), np.float32)
            for i, v in enumerate(values):
                padded[i, : v.shape[0]] = v
            out[key], out["text_len"] = padded, lens
        else:
            shapes = {np.shape(v) for v in values}
            if len(shapes) > 1:
                raise ValueError(
                    f"cannot batch '{key}' of different shapes {sorted(shapes)}: samples of different h/w templates "
                    "or durations need batch_size=1 (as the release) or shape bucketing")
            out[key] = np.stack([np.asarray(v) for v in values])
    return out


def _finish(ds: grain.MapDataset, decode: Callable, options: DataOptions, counter: SkipCounter,
            process_index: int, process_count: int) -> Pipeline:
    # Finite epochs need equal shards (every process must run the same number of steps); the cut is counted. An
    # endless stream keeps every sample: processes need not reach their epoch ends together.
    even = options.num_epochs is not None
    remainder = len(ds) % process_count if even else 0
    ds = shard(ds, process_index, process_count, drop_remainder=even)
    if remainder:
        counter.add("shard_remainder", remainder)
        log.warning("%d samples left out so that %d processes get equal shards (num_epochs=%s)", remainder,
                    process_count, options.num_epochs)
    n = len(ds)
    if options.shuffle:
        ds = ds.shuffle(seed=_seed(options.seed, process_index, 0))
    ds = ds.repeat(options.num_epochs)
    ds = ds.random_map(decode, seed=_seed(options.seed, process_index, 1))
    read = grain.ReadOptions(num_threads=options.num_threads, prefetch_buffer_size=options.prefetch)
    # Only a shard where every sample fails can produce 2n failures in a row (runs may span an epoch boundary).
    it = SkipFailuresIterDataset(ds.to_iter_dataset(read), counter, max_consecutive=2 * n)
    it = it.batch(options.batch_size, drop_remainder=options.drop_remainder, batch_fn=stack_batch)
    return Pipeline(dataset=it, skipped=counter, num_samples=n)


def decode_sample(sample: md.Sample, rng: np.random.Generator, options: DataOptions) -> dict | Skipped:
    """One metadata sample -> training element, or ``Skipped`` (never raises for bad data).

    Element: ``video [T, H, W, 3] float32`` in [-1, 1] (T = 1 for images), ``caption`` (the training caption),
    ``key``, ``path``, ``duration float32`` (mapped seconds, 0 for images), ``template float32``.
    """
    try:
        if sample.kind == "image":
            clip = vid.load_image(sample.path, options.pn, options.spatial_stride)
            duration = 0.0
        else:
            info = None
            if sample.sample_frames is None:
                info = vid.probe(sample.path)
                resolved, reason = md.resolve_duration(sample, info.duration, options.rule)
                if resolved is None:
                    return Skipped(reason, sample.origin, f"{info.duration:.3f}s of video in {sample.path}")
                sample = resolved
            clip = vid.load_clip(sample.path, sample.sample_frames, options.pn, video_fps=options.rule.video_fps,
                                 begin_frame_id=sample.begin_frame_id, start_s=sample.start_s, info=info,
                                 stride=options.spatial_stride)
            duration = float(sample.mapped_duration)
        caption = md.training_caption(sample, rng, short_prob=options.short_prob,
                                      dynamic_length=options.dynamic_length, append_duration=options.append_duration)
    except vid.VideoError as e:
        return Skipped(e.reason, sample.origin, str(e))
    except Exception as e:  # noqa: BLE001 - a long run must survive any one bad file; logged with its type
        log.exception("unexpected error decoding %s", sample.origin)
        return Skipped("error", sample.origin, f"{type(e).__name__}: {e}")
    return {"video": clip.frames, "caption": caption, "key": sample.key, "path": sample.path,
            "duration": np.float32(duration), "template": np.float32(clip.template)}


class _Decode:
    # A class (not a closure) so the pipeline stays picklable for multiprocess prefetch.
    def __init__(self, options: DataOptions):
        self.options = options

    def __call__(self, sample: md.Sample, rng: np.random.Generator):
        return decode_sample(sample, rng, self.options)


def video_pipeline(samples: Sequence[md.Sample] | md.Metadata, options: DataOptions = DataOptions(), *,
                   process_index: int | None = None, process_count: int | None = None) -> Pipeline:
    """Batches of decoded videos from metadata samples (``load_metadata``).

    Each batch: ``video [B, T, H, W, 3] float32``, ``caption [B] str``, ``key``, ``path``, ``duration [B]``,
    ``template [B]``. Drops counted at metadata time (``Metadata.skipped``) start the counter.
    """
    initial = samples.skipped if isinstance(samples, md.Metadata) else None
    samples = samples.samples if isinstance(samples, md.Metadata) else list(samples)
    if not samples:
        raise ValueError("no samples to build a pipeline from")
    index, count = _process(process_index, process_count)
    return _finish(grain.MapDataset.source(samples), _Decode(options), options, SkipCounter(initial), index, count)


class _DecodeCached:
    def __init__(self, source, options: DataOptions, use_cached_text: bool):
        self.source, self.options, self.use_cached_text = source, options, use_cached_text

    def __call__(self, index: int, rng: np.random.Generator):
        return decode_cached(self.source, index, rng, self.options, self.use_cached_text)


def decode_cached(source, index: int, rng: np.random.Generator, options: DataOptions,
                  use_cached_text: bool = True) -> dict | Skipped:
    """One token-cache entry -> training element, or ``Skipped``.

    The training duration rule maps the clip's real duration; the cached latent (encoded at the longest duration) is
    cut to its first ``pt`` latent frames, as the reference does. Element: ``latent [pt, h, w, C] float32``,
    ``caption``, ``key``, ``duration``; with ``use_cached_text`` also ``text [len, D] float32`` and the caption
    those features encode; otherwise a caption drawn with the caption rule (for an online text encoder).
    """
    from infstar_jax.data import cache as cache_mod

    try:
        entry = source[index]
    except cache_mod.CacheError as e:
        return Skipped("cache_unreadable", f"cache entry {index}", str(e))
    except Exception as e:  # noqa: BLE001
        log.exception("unexpected error reading cache entry %d", index)
        return Skipped("error", f"cache entry {index}", f"{type(e).__name__}: {e}")
    meta = entry["meta"]
    sample = cache_mod.sample_from_meta(meta)
    origin = f"cache {meta['key']} ({sample.origin})"
    latent = entry["latent"]
    if sample.kind == "image":
        pt, duration = 1, 0.0
    else:
        mapped, reason = options.rule.classify(meta["real_duration"])
        if mapped is None:
            return Skipped(reason, origin, f"{meta['real_duration']:.3f}s of video")
        sample = dataclasses.replace(sample, mapped_duration=mapped, sample_frames=options.rule.sample_frames(mapped))
        pt, duration = schedules.latent_frames(sample.sample_frames), float(mapped)
    if latent.shape[0] < pt:
        return Skipped("cache_too_short", origin, f"cached latent has {latent.shape[0]} frames, training needs {pt}")
    out = {"latent": latent[:pt], "key": meta["key"], "duration": np.float32(duration)}
    if use_cached_text:
        if entry["text"] is None:
            return Skipped("cache_no_text", origin, "the cache holds no text features for this entry")
        out["text"], out["caption"] = entry["text"], meta["caption"]
    else:
        out["caption"] = md.training_caption(sample, rng, short_prob=options.short_prob,
                                             dynamic_length=options.dynamic_length,
                                             append_duration=options.append_duration)
    return out


def cache_pipeline(source, options: DataOptions = DataOptions(), *, use_cached_text: bool = True,
                   process_index: int | None = None, process_count: int | None = None) -> Pipeline:
    """Batches from a token cache (``cache.CacheSource``): ``latent [B, pt, h, w, C]``, ``caption [B]``, ``key``,
    ``duration [B]`` and, with ``use_cached_text``, ``text [B, L, D]`` + ``text_len [B]``."""
    if len(source) == 0:
        raise ValueError(f"the token cache {source} is empty")
    index, count = _process(process_index, process_count)
    ds = grain.MapDataset.range(len(source))
    return _finish(ds, _DecodeCached(source, options, use_cached_text), options, SkipCounter(), index, count)


def global_batch(local: Mapping[str, Any], mesh, rules: Sequence[tuple[str, Any]] = parallel.DEFAULT_RULES,
                 ) -> dict[str, Any]:
    """Turns this process's batch into global ``jax.Array``s split over the mesh's batch axes.

    Every numeric array's leading (batch) dimension is sharded like the logical ``activation_batch`` axis
    (``("data", "fsdp")`` by default) with ``jax.make_array_from_process_local_data``; the global batch is the
    concatenation of all processes' local batches. Strings stay host-side numpy arrays of this process.
    """
    spec = parallel.logical_to_spec(("activation_batch",), rules)
    axes = spec[0] if spec else None
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    out = {}
    for key, value in local.items():
        value = np.asarray(value)
        if value.dtype.kind in "USO":
            out[key] = value
            continue
        rows = value.shape[0] * jax.process_count()
        if rows % shards:
            raise ValueError(f"global batch of {rows} rows of '{key}' cannot be split over the {shards} devices of "
                             f"mesh axes {axes}; use a per-process batch size that makes it divisible")
        sharding = NamedSharding(mesh, parallel.logical_to_spec(("activation_batch",) + (None,) * (value.ndim - 1),
                                                                rules))
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out
