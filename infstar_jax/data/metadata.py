"""Training metadata: the reference's jsonl format and a plain native one, the duration mapping and the caption rule.

Reference format (SPEC §7.1, ``data/README.md``), one JSON object per line, files found as ``FOLDER/*/*.jsonl``:

* video: ``video_path``, ``begin_frame_id``, ``end_frame_id``, ``fps``, ``tarsier2_caption``; optional
  ``MiniCPM_V_2_6_caption`` (when non-empty, chosen 50/50 with the tarsier2 caption) and ``quality_prompt`` (appended
  after a space); ``width``, ``height``, ``h_div_w`` are ignored (the decoded frames decide the template);
* image: ``image_path``, ``text``, ``long_caption`` (the short ``text`` is chosen with probability ``short_cap_prob``
  when both exist).

Native format: one JSON object per line with ``path`` and ``caption`` and optional ``start_s`` / ``end_s`` (seconds);
a path with an image extension is an image. Without ``end_s`` the clip runs to the end of the video, whose length is
read when the sample is decoded.

Relative paths are resolved against ``root``: by default the current directory for the reference format (as the
reference, whose toy paths start with ``data/``) and the jsonl file's own directory for the native format.

Duration mapping (``dataset_joint_vi.py:get_meta``): ``real = (end - begin) / fps``,
``mapped = int(real / resolution) * resolution``; a sample is dropped if ``mapped < (min_video_frames - 1) // fps``,
and a longer one is dropped (``drop_long_video``) or clipped to ``(video_frames - 1) // fps`` seconds. The clip then has
``sample_frames = int(mapped * fps + 1)`` frames.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import json
import logging
import math
import numbers
import os
from collections.abc import Iterable, Sequence

import numpy as np

from infstar_jax import schedules
from infstar_jax.data.video import is_image_path
from infstar_jax.text import prompts

log = logging.getLogger(__name__)

REFERENCE_VIDEO_KEYS = ("video_path", "begin_frame_id", "end_frame_id", "fps", "tarsier2_caption")
MINICPM_CAPTION = "MiniCPM_V_2_6_caption"


@dataclasses.dataclass(frozen=True)
class DurationRule:
    """The reference's duration mapping. Defaults are the released training settings (81 frames at 16 fps, 1 s
    resolution, no minimum, long videos clipped); the token-cache extraction uses ``duration_resolution=0.25``."""

    video_fps: int = schedules.FPS
    video_frames: int = 81
    min_video_frames: int = -1
    duration_resolution: float = 1
    drop_long_video: bool = False

    def __post_init__(self):
        if self.video_fps <= 0 or self.duration_resolution <= 0:
            raise ValueError(f"video_fps and duration_resolution must be positive, got {self}")
        if self.video_frames < 1:
            raise ValueError(f"video_frames must be >= 1, got {self.video_frames}")

    @property
    def min_duration(self) -> int:
        return (self.min_video_frames - 1) // self.video_fps

    @property
    def max_duration(self) -> int:
        return (self.video_frames - 1) // self.video_fps

    def map(self, real_seconds: float) -> int | float | None:
        """Mapped duration in seconds, or ``None`` if the sample is dropped (too short, or too long with
        ``drop_long_video``). An int when the resolution is a whole number of seconds (as in the reference, whose
        default resolution is the int 1)."""
        return self.classify(real_seconds)[0]

    def classify(self, real_seconds: float) -> tuple[int | float | None, str | None]:
        """``(mapped, None)`` for a kept sample, ``(None, "too_short" | "too_long")`` for a dropped one."""
        res = self.duration_resolution
        if float(res).is_integer():
            res = int(res)
        mapped = int(real_seconds / res) * res
        if mapped < self.min_duration:
            return None, "too_short"
        if mapped > self.max_duration:
            if self.drop_long_video:
                return None, "too_long"
            mapped = self.max_duration
        return mapped, None

    def sample_frames(self, mapped: float) -> int:
        """Frames of a clip of ``mapped`` seconds: ``int(mapped * video_fps + 1)``."""
        return int(mapped * self.video_fps + 1)


@dataclasses.dataclass(frozen=True)
class Sample:
    """One training sample as read from metadata.

    ``path``: resolved file path; ``source_path``: the path as written (used for cache keys, so a cache survives a
    move of the data root). ``captions``/``caption_weights``: candidate captions and their probabilities (one
    caption with weight 1 in the common case). For videos, ``begin_frame_id``/``end_frame_id``/``fps`` (reference) or
    ``start_s``/``end_s`` (native); ``mapped_duration`` and ``sample_frames`` are ``None`` when the duration is only
    known after probing the file (native entries without ``end_s``). ``origin`` is ``file:line`` for messages.
    """

    kind: str
    path: str
    source_path: str
    captions: tuple[str, ...]
    caption_weights: tuple[float, ...]
    origin: str
    quality_prompt: str | None = None
    begin_frame_id: int | None = None
    end_frame_id: int | None = None
    fps: float | None = None
    start_s: float | None = None
    end_s: float | None = None
    mapped_duration: int | float | None = None
    sample_frames: int | None = None

    @property
    def key(self) -> str:
        """A stable id of the clip (its source path and range): the token-cache key."""
        ident = json.dumps([self.kind, self.source_path, self.begin_frame_id, self.end_frame_id, self.start_s,
                            self.end_s])
        return hashlib.md5(ident.encode("utf-8")).hexdigest()


@dataclasses.dataclass
class Metadata:
    """Samples read from jsonl files plus the lines that were dropped, counted by reason (``bad_json``,
    ``bad_entry``, ``too_short``, ``too_long``)."""

    samples: list[Sample]
    skipped: collections.Counter


def find_jsonl(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """jsonl files named by ``paths``: a file is taken as is; a folder gives ``FOLDER/*.jsonl`` and, as the
    reference, ``FOLDER/*/*.jsonl`` (sorted)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = []
    for p in map(os.fspath, paths):
        if os.path.isdir(p):
            found = sorted(glob.glob(os.path.join(p, "*.jsonl"))) + sorted(glob.glob(os.path.join(p, "*", "*.jsonl")))
            if not found:
                raise FileNotFoundError(f"no .jsonl files in {p} (looked for {p}/*.jsonl and {p}/*/*.jsonl)")
            out.extend(found)
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"metadata path {p} does not exist (expected a .jsonl file or a folder of them)")
    return out


def _resolve(path: str, root: str) -> str:
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(root, path))


def _records(files: Sequence[str], skipped: collections.Counter):
    for file in files:
        with open(file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    skipped["bad_json"] += 1
                    log.warning("skipping %s:%d: not valid JSON (%s)", file, lineno, e)
                    continue
                if not isinstance(rec, dict):
                    skipped["bad_json"] += 1
                    log.warning("skipping %s:%d: expected a JSON object, got %s", file, lineno, type(rec).__name__)
                    continue
                yield file, lineno, rec


def _number(rec: dict, key: str, origin: str) -> float:
    v = rec.get(key)
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise ValueError(f"{origin}: field {key!r} must be a number, got {v!r}")
    return v


def _text(rec: dict, key: str, origin: str, required: bool = True) -> str | None:
    v = rec.get(key)
    if v is None or v == "":
        if required:
            raise ValueError(f"{origin}: field {key!r} must be a non-empty string, got {v!r}")
        return None
    if not isinstance(v, str):
        raise ValueError(f"{origin}: field {key!r} must be a string, got {type(v).__name__}")
    return v


def _drop(skipped, reason, origin, message):
    skipped[reason] += 1
    log.info("dropping %s: %s", origin, message)


def _reference_video(rec, origin, root, rule, skipped) -> Sample | None:
    begin = int(_number(rec, "begin_frame_id", origin))
    end = int(_number(rec, "end_frame_id", origin))
    fps = _number(rec, "fps", origin)
    if fps <= 0 or end < begin:
        raise ValueError(f"{origin}: need fps > 0 and end_frame_id >= begin_frame_id, got fps={fps}, "
                         f"frames {begin}..{end}")
    mapped, reason = rule.classify((end - begin) / fps)
    if mapped is None:
        _drop(skipped, reason, origin, f"{(end - begin) / fps:.3f}s of video is {reason.replace('_', ' ')} for {rule}")
        return None
    captions = [_text(rec, "tarsier2_caption", origin)]
    minicpm = _text(rec, MINICPM_CAPTION, origin, required=False)
    if minicpm:
        captions.append(minicpm)
    # The reference appends quality_prompt (after a space) whenever the key exists, even when it is empty.
    quality = None
    if "quality_prompt" in rec:
        quality = rec["quality_prompt"]
        if not isinstance(quality, str):
            raise ValueError(f"{origin}: field 'quality_prompt' must be a string, got {quality!r}")
    src = _text(rec, "video_path", origin)
    return Sample(kind="video", path=_resolve(src, root), source_path=src, captions=tuple(captions),
                  caption_weights=tuple([1 / len(captions)] * len(captions)), origin=origin,
                  quality_prompt=quality, begin_frame_id=begin, end_frame_id=end, fps=float(fps),
                  mapped_duration=mapped, sample_frames=rule.sample_frames(mapped))


def _reference_image(rec, origin, root, short_cap_prob) -> Sample:
    text = _text(rec, "text", origin, required=False)
    long_caption = _text(rec, "long_caption", origin, required=False)
    if not text and not long_caption:
        raise ValueError(f"{origin}: an image entry needs a non-empty 'text' or 'long_caption'")
    if text and long_caption:
        captions, weights = (text, long_caption), (short_cap_prob, 1 - short_cap_prob)
    else:
        captions, weights = (text or long_caption,), (1.0,)
    src = _text(rec, "image_path", origin)
    return Sample(kind="image", path=_resolve(src, root), source_path=src, captions=captions,
                  caption_weights=weights, origin=origin, mapped_duration=None, sample_frames=1)


def _native(rec, origin, root, rule, skipped) -> Sample | None:
    src = _text(rec, "path", origin)
    caption = _text(rec, "caption", origin)
    path = _resolve(src, root)
    if is_image_path(src):
        return Sample(kind="image", path=path, source_path=src, captions=(caption,), caption_weights=(1.0,),
                      origin=origin, sample_frames=1)
    start = float(_number(rec, "start_s", origin)) if rec.get("start_s") is not None else None
    end = float(_number(rec, "end_s", origin)) if rec.get("end_s") is not None else None
    if (start or 0.0) < 0 or (end is not None and end < (start or 0.0)):
        raise ValueError(f"{origin}: need 0 <= start_s <= end_s, got start_s={start}, end_s={end}")
    mapped = frames = None
    if end is not None:
        mapped, reason = rule.classify(end - (start or 0.0))
        if mapped is None:
            real = end - (start or 0.0)
            _drop(skipped, reason, origin, f"{real:.3f}s of video is {reason.replace('_', ' ')} for {rule}")
            return None
        frames = rule.sample_frames(mapped)
    return Sample(kind="video", path=path, source_path=src, captions=(caption,), caption_weights=(1.0,),
                  origin=origin, start_s=start, end_s=end, mapped_duration=mapped, sample_frames=frames)


def load_metadata(paths, *, format: str = "auto", rule: DurationRule = DurationRule(), root: str | None = None,
                  short_cap_prob: float = prompts.DEFAULT_SHORT_PROB) -> Metadata:
    """Reads jsonl metadata into ``Sample`` records.

    Args:
      paths: a jsonl file, a folder (``*.jsonl`` and ``*/*.jsonl``), or a list of them.
      format: "reference", "native", or "auto" (per line: ``video_path``/``image_path`` -> reference, ``path`` ->
        native).
      rule: the duration mapping.
      root: folder that relative paths are resolved against (default: see the module docstring).
      short_cap_prob: probability of the short ``text`` caption of reference image entries.
    Returns:
      ``Metadata``; malformed lines and lines whose duration falls outside the rule are dropped, counted and logged.
    """
    if format not in ("auto", "reference", "native"):
        raise ValueError(f"unknown metadata format {format!r}; expected 'auto', 'reference' or 'native'")
    files = find_jsonl(paths)
    skipped: collections.Counter = collections.Counter()
    samples = []
    for file, lineno, rec in _records(files, skipped):
        origin = f"{file}:{lineno}"
        fmt = format
        if fmt == "auto":
            fmt = "reference" if ("video_path" in rec or "image_path" in rec) else "native"
        try:
            if fmt == "reference":
                ref_root = os.getcwd() if root is None else root
                if "video_path" in rec:
                    sample = _reference_video(rec, origin, ref_root, rule, skipped)
                elif "image_path" in rec:
                    sample = _reference_image(rec, origin, ref_root, short_cap_prob)
                else:
                    raise ValueError(f"{origin}: neither 'video_path' nor 'image_path' in a reference-format entry")
            else:
                sample = _native(rec, origin, os.path.dirname(os.path.abspath(file)) if root is None else root,
                                 rule, skipped)
        except ValueError as e:
            skipped["bad_entry"] += 1
            log.warning("skipping %s", e)
            continue
        if sample is not None:
            samples.append(sample)
    if skipped:
        log.warning("metadata: %d samples kept, dropped %s", len(samples), dict(skipped))
    if not samples:
        raise ValueError(f"no usable samples in {files} (dropped: {dict(skipped) or 'none'})")
    return Metadata(samples=samples, skipped=skipped)


def resolve_duration(sample: Sample, video_duration: float, rule: DurationRule) -> tuple[Sample | None, str | None]:
    """Fills ``mapped_duration``/``sample_frames`` of a native entry without ``end_s`` from its video's duration.

    Returns ``(sample, None)``, or ``(None, "too_short" | "too_long")`` when the rule drops it.
    """
    if sample.sample_frames is not None:
        return sample, None
    mapped, reason = rule.classify(video_duration - (sample.start_s or 0.0))
    if mapped is None:
        return None, reason
    return dataclasses.replace(sample, mapped_duration=mapped, sample_frames=rule.sample_frames(mapped)), None


def duration_text(mapped: int | float) -> str:
    """The reference's duration prefix ``f'<<<t={mapped}s>>>'`` for any mapped duration (``<<<t=5s>>>`` for the
    int durations of training, ``<<<t=4.75s>>>`` for fractional ones)."""
    if isinstance(mapped, numbers.Integral):
        return prompts.duration_prefix(int(mapped))
    return f"<<<t={mapped}s>>>"


def choose_caption(sample: Sample, rng: np.random.Generator) -> str:
    """One of the sample's candidate captions (no random draw when there is a single one)."""
    if len(sample.captions) == 1:
        return sample.captions[0]
    return sample.captions[int(rng.choice(len(sample.captions), p=np.asarray(sample.caption_weights)))]


def training_caption(sample: Sample, rng: np.random.Generator, *, short_prob: float = prompts.DEFAULT_SHORT_PROB,
                     dynamic_length: bool = True, append_duration: bool = True) -> str:
    """The caption a training step sees (SPEC §7.1): a candidate caption, sentence truncation with probability
    ``short_prob``, ``quality_prompt`` appended, then (videos, ``append_duration``) the ``<<<t=Ns>>>`` prefix."""
    caption = choose_caption(sample, rng)
    if sample.kind == "image":
        return prompts.training_caption(caption, None, rng, short_prob=short_prob, dynamic_length=dynamic_length)
    if sample.mapped_duration is None:
        raise ValueError(f"{sample.origin}: the duration of {sample.path} is not resolved yet")
    mapped = sample.mapped_duration
    whole = isinstance(mapped, numbers.Integral)
    text = prompts.training_caption(caption, int(mapped) if (append_duration and whole) else None, rng,
                                    short_prob=short_prob, dynamic_length=dynamic_length,
                                    quality_prompt=sample.quality_prompt)
    if append_duration and not whole:
        text = duration_text(mapped) + text
    return text
