"""Token cache: per-sample VAE latents and text features in a tensorstore (zarr v3) store, filled resumably.

The release trains from cached VAE features (SPEC §7.1: ``use_vae_token_cache=1``, the posterior *sample* of each
clip at the longest duration, cut to the needed latent frames at training time). Layout under ``ROOT`` (a local
folder or any tensorstore kvstore URL such as ``gs://bucket/cache/``)::

    ROOT/cache.json                 format, pixel level, frame rate (checked on every fill)
    ROOT/arrays/<key>/latent/       zarr3 array [t, h, w, C] float32   (channels-last)
    ROOT/arrays/<key>/text/         zarr3 array [len, D] float32       (optional)
    ROOT/index/<key>.json           the sample's metadata; written last: an entry exists iff this file exists

Writing the index file last makes each sample atomic: a fill killed mid-sample leaves arrays without an index file,
which the next fill overwrites. ``<key>`` is ``Sample.key`` (md5 of the source path and clip range), so the same
clip is encoded once even if the metadata repeats it, and processes write disjoint keys.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from infstar_jax import schedules
from infstar_jax.data import metadata as md
from infstar_jax.data import video as vid

log = logging.getLogger(__name__)

FORMAT = "infstar-token-cache/1"


class CacheError(RuntimeError):
    """A cache entry or the cache itself cannot be read or written."""


def _kvstore_url(root: str) -> str:
    if "://" in root:
        return root.rstrip("/") + "/"
    return "file://" + os.path.abspath(root).rstrip("/") + "/"


def _to_json(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    return value


class TokenCache:
    """A token cache at ``root`` (folder path or kvstore URL)."""

    def __init__(self, root: str | os.PathLike):
        self.root = os.fspath(root)
        self._url = _kvstore_url(self.root)
        self._kv = ts.KvStore.open(self._url).result()

    def __repr__(self) -> str:
        return f"TokenCache({self.root!r})"

    # ---- store-level info ----------------------------------------------------------------------------------------
    def info(self) -> dict | None:
        """Contents of ``cache.json``, or ``None`` for a new cache."""
        r = self._kv.read("cache.json").result()
        return json.loads(r.value) if r.state == "value" else None

    def ensure_info(self, pn: int | str, video_fps: int) -> dict:
        """Writes ``cache.json`` for a new cache, or checks that an existing one was filled with the same settings."""
        want = {"format": FORMAT, "pn": pn, "video_fps": int(video_fps)}
        have = self.info()
        if have is None:
            self._kv.write("cache.json", json.dumps(want).encode()).result()
            return want
        if have.get("format") != FORMAT:
            raise CacheError(f"{self.root} is not a token cache of format {FORMAT} (cache.json: {have})")
        if have.get("pn") != pn or have.get("video_fps") != int(video_fps):
            raise CacheError(f"{self.root} was filled with pn={have.get('pn')!r}, video_fps={have.get('video_fps')}; "
                             f"refusing to add entries with pn={pn!r}, video_fps={video_fps} (use another folder)")
        return have

    # ---- entries -------------------------------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return self._kv.read(f"index/{key}.json").result().state == "value"

    def keys(self) -> list[str]:
        """Sorted keys of complete entries."""
        names = self._kv.list(ts.KvStore.KeyRange("index/", "index0")).result()
        return sorted(n.decode()[len("index/"):-len(".json")] for n in names if n.endswith(b".json"))

    def _array_spec(self, key: str, name: str) -> dict:
        return {"driver": "zarr3", "kvstore": f"{self._url}arrays/{key}/{name}/"}

    def _write_array(self, key: str, name: str, array: np.ndarray) -> None:
        store = ts.open(self._array_spec(key, name), create=True, delete_existing=True, dtype=ts.float32,
                        shape=array.shape, chunk_layout=ts.ChunkLayout(chunk_shape=array.shape)).result()
        store.write(array).result()

    def write(self, key: str, latent: np.ndarray, text: np.ndarray | None, meta: dict) -> None:
        """Stores one entry: ``latent [t, h, w, C]``, optional ``text [len, D]`` (both cast to float32) and ``meta``
        (JSON); the index file goes last (the commit)."""
        latent = np.ascontiguousarray(latent, np.float32)
        if latent.ndim != 4:
            raise CacheError(f"latent of {key} must be [t, h, w, C], got shape {latent.shape}")
        self._write_array(key, "latent", latent)
        meta = dict(meta, key=key, latent_shape=list(latent.shape), text_shape=None)
        if text is not None:
            text = np.ascontiguousarray(text, np.float32)
            if text.ndim != 2:
                raise CacheError(f"text features of {key} must be [len, D], got shape {text.shape}")
            self._write_array(key, "text", text)
            meta["text_shape"] = list(text.shape)
        self._kv.write(f"index/{key}.json", json.dumps(_to_json(meta)).encode()).result()

    def read_meta(self, key: str) -> dict:
        r = self._kv.read(f"index/{key}.json").result()
        if r.state != "value":
            raise CacheError(f"no entry {key} in {self.root}")
        try:
            return json.loads(r.value)
        except json.JSONDecodeError as e:
            raise CacheError(f"index file of {key} in {self.root} is not valid JSON: {e}") from e

    def _read_array(self, key: str, name: str, shape) -> np.ndarray:
        try:
            array = ts.open(self._array_spec(key, name), open=True).result().read().result()
        except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError/RuntimeError variants
            raise CacheError(f"cannot read {name} of entry {key} in {self.root}: {e}") from e
        if list(array.shape) != list(shape):
            raise CacheError(f"{name} of entry {key} has shape {array.shape}, its index says {shape}")
        return np.asarray(array, np.float32)

    def read(self, key: str) -> dict:
        """``{"latent": [t, h, w, C] float32, "text": [len, D] float32 | None, "meta": dict}``."""
        meta = self.read_meta(key)
        latent = self._read_array(key, "latent", meta["latent_shape"])
        text = self._read_array(key, "text", meta["text_shape"]) if meta.get("text_shape") else None
        return {"latent": latent, "text": text, "meta": meta}


class CacheSource:
    """grain random-access source over a token cache: ``source[i]`` is ``TokenCache.read(keys[i])``.

    ``keys`` defaults to every complete entry (sorted), each once; pass e.g. ``[s.key for s in samples]`` to follow
    a metadata list (repeats included).
    """

    def __init__(self, cache: TokenCache | str | os.PathLike, keys: Sequence[str] | None = None):
        self.cache = cache if isinstance(cache, TokenCache) else TokenCache(cache)
        self.keys = list(self.cache.keys() if keys is None else keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict:
        return self.cache.read(self.keys[index])

    def __repr__(self) -> str:
        return f"CacheSource({self.cache.root!r}, {len(self.keys)} entries)"


def sample_from_meta(meta: dict) -> md.Sample:
    """The ``metadata.Sample`` an entry was encoded from (durations as cached)."""
    fields = {f.name for f in dataclasses.fields(md.Sample)}
    kwargs = {k: meta[k] for k in fields if k in meta}
    kwargs["captions"] = tuple(kwargs["captions"])
    kwargs["caption_weights"] = tuple(kwargs["caption_weights"])
    return md.Sample(**kwargs)


def real_duration(sample: md.Sample, video_duration: float | None = None) -> float | None:
    """Seconds of the clip before the duration mapping (``None`` for images)."""
    if sample.kind == "image":
        return None
    if sample.begin_frame_id is not None:
        return (sample.end_frame_id - sample.begin_frame_id) / sample.fps
    if sample.end_s is not None:
        return sample.end_s - (sample.start_s or 0.0)
    return video_duration - (sample.start_s or 0.0)


@dataclasses.dataclass
class FillReport:
    """What one ``fill_cache`` call did on this process."""

    written: int = 0
    existing: int = 0
    duplicates: int = 0
    failed: collections.Counter = dataclasses.field(default_factory=collections.Counter)


def _decode_for_cache(sample: md.Sample, pn, rule: md.DurationRule, stride: int = schedules.SPATIAL_STRIDE):
    """-> (sample with resolved duration, clip, real duration) or a (reason, message) failure tuple."""
    try:
        if sample.kind == "image":
            return sample, vid.load_image(sample.path, pn, stride), None
        info = None
        if sample.sample_frames is None:
            info = vid.probe(sample.path)
            resolved, reason = md.resolve_duration(sample, info.duration, rule)
            if resolved is None:
                return reason, f"{sample.origin}: {info.duration:.3f}s of video"
            sample = resolved
        clip = vid.load_clip(sample.path, sample.sample_frames, pn, video_fps=rule.video_fps,
                             begin_frame_id=sample.begin_frame_id, start_s=sample.start_s, info=info,
                             stride=stride)
        return sample, clip, real_duration(sample, clip.info.duration)
    except vid.VideoError as e:
        return e.reason, f"{sample.origin}: {e}"
    except Exception as e:  # noqa: BLE001 - one bad file must not end a long encode
        log.exception("unexpected error decoding %s", sample.origin)
        return "error", f"{sample.origin}: {type(e).__name__}: {e}"


def cache_caption(sample: md.Sample, text_rule: md.DurationRule, real: float | None,
                  append_duration: bool = True) -> str:
    """The caption whose text features are cached: the first candidate caption, no sentence truncation, the quality
    prompt, and the duration prefix of the *training* mapping (``text_rule``) of the clip (none if that mapping
    drops the clip)."""
    rng = np.random.default_rng(0)  # draws nothing: one candidate caption and dynamic_length=False
    first = dataclasses.replace(sample, captions=sample.captions[:1], caption_weights=(1.0,))
    if sample.kind == "video":
        mapped = text_rule.map(real)
        append_duration = append_duration and mapped is not None
        first = dataclasses.replace(first, mapped_duration=0 if mapped is None else mapped)
    return md.training_caption(first, rng, dynamic_length=False, append_duration=append_duration)


def fill_cache(
    samples: Iterable[md.Sample] | md.Metadata,
    encode_video_fn: Callable[[np.ndarray], Any],
    encode_text_fn: Callable[[str], Any] | None,
    cache: TokenCache | str | os.PathLike,
    *,
    pn: int | str,
    spatial_stride: int = schedules.SPATIAL_STRIDE,
    rule: md.DurationRule = md.DurationRule(duration_resolution=0.25),
    text_rule: md.DurationRule = md.DurationRule(),
    append_duration: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    decode_threads: int = 2,
    progress: bool | None = None,
) -> FillReport:
    """Encodes every sample not yet in the cache (this process's share) and stores it.

    Args:
      samples: metadata samples, loaded with the cache's duration rule (the release extracts at 0.25 s resolution,
        81 frames at 16 fps: ``DurationRule(duration_resolution=0.25)``).
      encode_video_fn: ``frames [T, H, W, 3] float32 in [-1, 1] -> latent [t, h, w, C]`` (the VAE posterior sample).
      encode_text_fn: ``caption -> features [len, D]`` (T5, the kept rows), or ``None`` to store no text.
      cache: a ``TokenCache`` or its root.
      pn: pixel level or number of scales (frame size).
      spatial_stride: the encoding tokenizer's pixels per latent position (16 for the release's VAE).
      rule: duration rule for native entries whose duration is read from the file (same as the metadata's).
      text_rule / append_duration: the training duration mapping used for the cached caption's ``<<<t=Ns>>>``.
      process_index / process_count: this process's share is every ``process_count``-th unique key (default: JAX).
      decode_threads: videos decoded ahead of the encoder.
      progress: show a progress bar (default: on process 0).
    Returns:
      a ``FillReport``; unusable videos are counted in ``failed`` by reason and logged, never raised.
    """
    import jax
    from tqdm import tqdm

    cache = cache if isinstance(cache, TokenCache) else TokenCache(cache)
    if isinstance(samples, md.Metadata):
        samples = samples.samples
    index = jax.process_index() if process_index is None else int(process_index)
    count = jax.process_count() if process_count is None else int(process_count)
    cache.ensure_info(pn, rule.video_fps)
    unique: dict[str, md.Sample] = {}
    report = FillReport()
    for s in samples:
        if s.key in unique:
            report.duplicates += 1
        else:
            unique[s.key] = s
    mine = [unique[k] for k in sorted(unique)[index::count]]
    todo = []
    for s in mine:
        if cache.has(s.key):
            report.existing += 1
        else:
            todo.append(s)
    log.info("token cache %s: %d unique samples, %d for process %d/%d, %d already cached, %d to encode",
             cache.root, len(unique), len(mine), index, count, report.existing, len(todo))
    bar = tqdm(total=len(todo), desc=f"encode [{index + 1}/{count}]", unit="clip",
               disable=not (index == 0 if progress is None else progress))
    threads = max(1, decode_threads)
    todo_iter = iter(todo)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        pending = collections.deque(pool.submit(_decode_for_cache, s, pn, rule, spatial_stride)
                                    for s in itertools.islice(todo_iter, 2 * threads))
        while pending:
            result = pending.popleft().result()
            nxt = next(todo_iter, None)
            if nxt is not None:
                pending.append(pool.submit(_decode_for_cache, nxt, pn, rule, spatial_stride))
            bar.update(1)
            if len(result) == 2:
                reason, message = result
                report.failed[reason] += 1
                log.warning("not cached (%s): %s", reason, message)
                continue
            sample, clip, real = result
            latent = np.asarray(encode_video_fn(clip.frames), np.float32)
            if latent.ndim != 4 or not np.isfinite(latent).all():
                raise CacheError(f"encode_video_fn returned {latent.shape} {'non-finite ' if latent.ndim == 4 else ''}"
                                 f"values for {sample.origin}; expected a finite [t, h, w, C] latent")
            caption = cache_caption(sample, text_rule, real, append_duration)
            text = None
            if encode_text_fn is not None:
                text = np.asarray(encode_text_fn(caption), np.float32)
            meta = {f.name: getattr(sample, f.name) for f in dataclasses.fields(md.Sample)}
            meta.update(real_duration=real, caption=caption, template=clip.template, pn=pn,
                        video_fps=rule.video_fps, frame_indices=clip.indices.tolist(),
                        frames=list(clip.frames.shape[:3]))
            cache.write(sample.key, latent, text, meta)
            report.written += 1
            bar.set_postfix(written=report.written, failed=sum(report.failed.values()))
    bar.close()
    log.info("token cache %s: wrote %d, %d already there, failed %s", cache.root, report.written, report.existing,
             dict(report.failed))
    return report

