"""Prompt and caption preparation of the release (SPEC §6.3 inference, §7.1 training), and length bucketing.

Inference (``tools/infer_video_*.py``): ``"<<<t=5s>>>" + prompt + ", Close-up on big objects, emphasize scale and
detail"``; tokenised with ``max_length=512``, the encoder's last hidden state is cut to its first ``len`` rows
(``len`` = real tokens incl. ``</s>``). Padding to 512 and padding to any length >= ``len`` give the same first
``len`` rows (padded keys are masked out, the relative bias depends only on offsets), so we pad to a small set of
bucket lengths to keep the number of compiled shapes low.

Training (``dataset_joint_vi.py``): with probability ``short_prob`` a caption keeps only its first k sentences
(k uniform in 1..n), an optional quality prompt is appended with a space, then the duration prefix is prepended.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np

DEFAULT_QUALITY_SUFFIX = ", Close-up on big objects, emphasize scale and detail"
DEFAULT_BUCKETS = (32, 64, 128, 256, 512)
DEFAULT_SHORT_PROB = 0.3  # scripts/train_*.sh: --short_cap_prob 0.3 with --enable_dynamic_length_prompt 1


def duration_prefix(seconds: int) -> str:
    """``<<<t={seconds}s>>>``; the release only ever formats whole seconds (an int), e.g. ``<<<t=5s>>>``."""
    if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real) or seconds != int(seconds) or seconds < 0:
        raise ValueError(f"duration must be a non-negative whole number of seconds, got {seconds!r}")
    return f"<<<t={int(seconds)}s>>>"


def inference_prompt(
    prompt: str,
    duration: int | None = 5,
    quality_suffix: str | None = DEFAULT_QUALITY_SUFFIX,
) -> str:
    """The string the release feeds to T5 for a user prompt (``infer_video_480p.py:112-115``).

    Args:
      prompt: the user's prompt.
      duration: seconds of video (5 or 10 in the release); ``None`` leaves the prefix out
        (``append_duration2caption=0``).
      quality_suffix: appended to the prompt verbatim; ``None`` or ``""`` for none.
    """
    text = prompt + (quality_suffix or "")
    return text if duration is None else duration_prefix(duration) + text


def truncate_sentences(caption: str, k: int) -> str:
    """The first ``k`` non-empty '.'-separated pieces, re-joined with '.' and ending with '.'."""
    pieces = [p for p in caption.split(".") if p]
    return ".".join(pieces[:k]) + "."


def random_drop_sentences(caption: str, rng: np.random.Generator) -> str:
    """Keeps the first k sentences, k uniform in ``1..n``; captions with fewer than 2 sentences are unchanged
    (and draw nothing from ``rng``)."""
    pieces = [p for p in caption.split(".") if p]
    if len(pieces) < 2:
        return caption
    return truncate_sentences(caption, int(rng.integers(1, len(pieces) + 1)))


def training_caption(
    caption: str,
    duration: int | None,
    rng: np.random.Generator,
    *,
    short_prob: float = DEFAULT_SHORT_PROB,
    dynamic_length: bool = True,
    quality_prompt: str | None = None,
    sentence_rng: np.random.Generator | None = None,
) -> str:
    """The training caption of one video sample (SPEC §7.1, ``dataset_joint_vi.py:199-204``).

    Args:
      caption: the chosen raw caption (non-empty).
      duration: the mapped duration in whole seconds; ``None`` for no prefix (``append_duration2caption=0``).
      rng: draws ``random() < short_prob`` (only when ``dynamic_length``), as the reference's per-rank generator.
      short_prob: probability of sentence truncation.
      dynamic_length: ``enable_dynamic_length_prompt``.
      quality_prompt: the sample's ``quality_prompt`` field, appended after a space when present.
      sentence_rng: draws the sentence count (the reference uses a second generator); defaults to ``rng``.
    Returns:
      e.g. ``"<<<t=5s>>>A cat runs. It jumps."``
    """
    if not caption:
        raise ValueError("empty caption")
    if dynamic_length and rng.random() < short_prob:
        caption = random_drop_sentences(caption, rng if sentence_rng is None else sentence_rng)
    if quality_prompt is not None:
        caption = caption + " " + quality_prompt
    return caption if duration is None else duration_prefix(duration) + caption


def choose_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``length``."""
    fitting = [b for b in buckets if b >= length]
    if not fitting:
        raise ValueError(f"sequence of {length} tokens is longer than the largest bucket {max(buckets)}")
    return min(fitting)


def pad_to_bucket(
    token_ids: Sequence[Sequence[int]], buckets: Sequence[int], pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads B token lists to the smallest bucket that fits the longest.

    Returns ``ids [B, Lb] int32`` and ``mask [B, Lb] int32`` (1 on the given tokens).
    """
    if not token_ids:
        raise ValueError("no sequences to pad")
    lb = choose_bucket(max(len(t) for t in token_ids), buckets)
    ids = np.full((len(token_ids), lb), pad_id, np.int32)
    mask = np.zeros((len(token_ids), lb), np.int32)
    for i, t in enumerate(token_ids):
        ids[i, : len(t)] = t
        mask[i, : len(t)] = 1
    return ids, mask


def keep_first_rows(features, lengths) -> list:
    """Per prompt, the first ``lengths[b]`` rows of ``features [B, L, D]`` (EOS row included).

    Returns a list of B arrays ``[len_b, D]``.
    """
    lengths = np.asarray(lengths)
    if lengths.shape != (features.shape[0],):
        raise ValueError(f"lengths has shape {lengths.shape}, expected ({features.shape[0]},)")
    return [features[b, : int(n)] for b, n in enumerate(lengths)]


def kv_compact(features, lengths) -> tuple[np.ndarray, np.ndarray]:
    """The reference's ``text_cond_tuple`` packing: the kept rows of every prompt concatenated.

    Returns ``(kv [sum(lengths), D] float32, cu_seqlens [B + 1] int32)`` with ``cu_seqlens = [0, cumsum(lengths)]``.
    """
    rows = keep_first_rows(np.asarray(features, np.float32), lengths)
    cu = np.concatenate([[0], np.cumsum(np.asarray(lengths, np.int64))]).astype(np.int32)
    return np.concatenate(rows, axis=0), cu
