"""Token-cache entries -> packed, shape-bucketed training batches, built on the host (SPEC §7.1, §7.3, §5).

What one train step sees
------------------------
A global batch holds ``rows`` packed sequences, one training example each (the release trains one example per GPU;
here the examples of all devices form one batch of identical shape). Every row of a step shares one **step shape**
(``StepShape``): the example's full scale schedule, the kept scales (the var-len outcome), and the text slot. The
shape fixes the block layout, the sequence length and every array shape, so it is the key of the compiled train
step. Per row, and free to differ between rows, are the data and the random choices:

* one repetition per kept scale (``repeat_idx``, uniform over the scale's repetitions) and the RoPE positions it
  implies;
* one self-correction flip probability per (scale, repetition) step, ``randint(0, 100·s + 1) / 100`` with
  ``s = noise_apply_strength`` (0.3: p uniform on {0, 0.01, ..., 0.30}), 0 on the schedule's last scale; the flips
  themselves are drawn inside the jitted step (``step.py``);
* text dropout (probability ``cond_drop`` per caption): the caption is replaced by ``cfg_uncond[:len]``.

The var-len outcome is drawn once per global batch with the configured probabilities (the release draws one per
example, one example per GPU; per-example marginals are the same). Images (1-clip schedules) keep all scales: the
released outcome lists only exist for videos.

Shape buckets: the compiled step variants
-----------------------------------------
Batches are formed inside **shape groups**: entries whose latent has the same ``(template, pt, h, w)`` after the
training duration mapping (so the same schedule). Each epoch every group is shuffled, cut into global batches
(the last one padded with zero-weight placeholder rows, so no sample is dropped and every process always has a
full batch), and the batches of all groups are shuffled together. A step's text slot is the smallest
``text_buckets`` entry that holds the longest caption of its global batch (taken from the index, so all processes
agree without communicating). The set of step shapes is therefore::

    {(group, outcome, text bucket)}:  group in the data's shape groups,
                                      outcome in the group's var-len outcomes (1 if var-len is off or for images),
                                      text bucket in {bucket(len) for the group's caption lengths}

``possible_shapes`` enumerates it before training (written to ``WORKDIR/step_shapes.json``); for the released
480p 5 s data (one template, 81 frames) and the default buckets (32, 64, 128, 256, 512) it is at most 6 x 5 = 30,
in practice 6 x 2. Sequence lengths are padded to a multiple of ``pad_to_multiple`` (128, the reference's).

Determinism and resumption
--------------------------
The batch plan of epoch ``e`` is a function of ``(seed, e)`` and the data index; all random choices of batch ``i``
come from generators seeded by ``(seed, i)`` (outcome) and ``(seed, i, global row)`` (per-row choices). The grain
iterator over batch numbers is checkpointable, so a resumed run produces exactly the same batches. The data index
(entry keys, shapes, caption lengths) is written to ``WORKDIR/data_index.json`` at the first start and reused on
resume, so entries added to the cache later do not reshuffle a running job.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from infstar_jax import schedules
from infstar_jax.data import metadata as md
from infstar_jax.tokenizer import multiscale
from infstar_jax.training import packing as packing_lib

log = logging.getLogger(__name__)

RELEASED_VAR_LEN_PROB = {
    "0.40M": (40, 30, 20, 6, 3, 1, 60, 40, 12, 6, 2),  # scripts/train_480p.sh
    "0.90M": (60, 20, 10, 6, 2, 1, 1),  # scripts/train_720p.sh
}
DEFAULT_TEXT_BUCKETS = (32, 64, 128, 256, 512)
PLACEHOLDER = -1  # entry id of a zero-weight row that pads a group's last batch


# ---- options ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PackingOptions:
    """How examples become packed rows (config ``schedule`` and ``train`` sections; model dims from the model).

    resolution / num_scales / image_rep / video_rep / semantic_scales / detail_scale_min_tokens: the schedule
      (``schedules.resolve``; ``None`` = released values of the resolution).
    var_len: draw a var-len outcome (SPEC §7.3); ``var_len_outcomes``: explicit kept-scale lists (``None`` = the
      released lists for the schedule's clip count); ``var_len_prob``: their weights (``None`` = the released
      script's list for the resolution, normalised over the first ``len(outcomes)``).
    noise_strength: self-correction strength (a float or one per scale index); ``noise_apply_layers``: scales
      ``si >= min(num_scales - 1, this)`` are never flipped.
    """

    resolution: str = "480p"
    num_scales: int | None = None
    image_rep: tuple[int, ...] | None = None
    video_rep: tuple[int, ...] | None = None
    semantic_scales: int | None = None
    detail_scale_min_tokens: int | None = None
    var_len: bool = True
    var_len_outcomes: tuple[tuple[int, ...], ...] | None = None
    var_len_prob: tuple[float, ...] | None = None
    drop_720p_last_scale: bool = True
    text_buckets: tuple[int, ...] = DEFAULT_TEXT_BUCKETS
    pad_to_multiple: int = 128
    reweight_k: int = 4
    max_reweight: float = 40.0
    cond_drop: float = 0.1
    noise_strength: float | tuple[float, ...] = 0.3
    noise_apply_layers: int = 1000
    latent_dim: int = 64
    detail_bits: int = 64
    semantic_bits: int = 16
    text_dim: int = 2048
    text_maxlen: int = 512

    def __post_init__(self):
        if not self.text_buckets or list(self.text_buckets) != sorted(set(self.text_buckets)) \
                or self.text_buckets[0] < 1:
            raise ValueError(f"text_buckets must be increasing positive lengths, got {self.text_buckets}")
        if not 0.0 <= self.cond_drop <= 1.0:
            raise ValueError(f"cond_drop must be a probability, got {self.cond_drop}")
        if self.pad_to_multiple < 1:
            raise ValueError(f"pad_to_multiple must be >= 1, got {self.pad_to_multiple}")

    @property
    def pixel_level(self) -> str:
        return schedules.RESOLUTIONS.get(self.resolution, self.resolution)

    def probabilities(self, n_outcomes: int) -> np.ndarray:
        prob = self.var_len_prob
        if prob is None:
            prob = RELEASED_VAR_LEN_PROB.get(self.pixel_level, RELEASED_VAR_LEN_PROB["0.40M"])
        return schedules.var_len_probabilities(prob, n_outcomes)


def _tuple(x):
    if x is None:
        return None
    if isinstance(x, (list, tuple)):
        return tuple(_tuple(v) for v in x)
    return x


def options_from_config(config, model_cfg) -> PackingOptions:
    """``PackingOptions`` from a run config (sections ``schedule``, ``train``, ``data``) and a ``TransformerConfig``."""
    s, t, d = config.schedule, config.train, config.data
    strength = t.noise_apply_strength
    return PackingOptions(
        resolution=s.resolution, num_scales=s.get("num_scales"), image_rep=_tuple(s.get("image_rep")),
        video_rep=_tuple(s.get("video_rep")), semantic_scales=s.get("semantic_scales"),
        detail_scale_min_tokens=s.get("detail_scale_min_tokens"), var_len=bool(t.var_len),
        var_len_outcomes=_tuple(t.get("var_len_outcomes")), var_len_prob=_tuple(t.get("var_len_prob")),
        drop_720p_last_scale=bool(t.drop_720p_last_scale), text_buckets=tuple(d.text_buckets),
        pad_to_multiple=int(t.pad_to_multiple), reweight_k=int(t.reweight_loss_by_scale),
        max_reweight=float(t.max_reweight_value), cond_drop=float(t.cond_drop),
        noise_strength=_tuple(strength) if isinstance(strength, (list, tuple)) else float(strength),
        noise_apply_layers=int(t.noise_apply_layers), latent_dim=model_cfg.latent_dim,
        detail_bits=model_cfg.detail_bits, semantic_bits=model_cfg.semantic_bits, text_dim=model_cfg.text_dim,
        text_maxlen=model_cfg.text_maxlen,
    )


# ---- schedules, outcomes, step shapes --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def resolve_schedule(options: PackingOptions, template: float, pt: int) -> schedules.Schedule:
    """The training schedule of a latent with ``pt`` frames at ``template`` (h/w)."""
    return schedules.resolve(
        options.resolution, aspect=float(template), frames=schedules.video_frames_for(int(pt)),
        num_scales=options.num_scales, image_rep=options.image_rep, video_rep=options.video_rep,
        semantic_scales=options.semantic_scales, detail_scale_min_tokens=options.detail_scale_min_tokens,
        training=True)


def outcomes(options: PackingOptions, sched: schedules.Schedule) -> tuple[tuple[tuple[int, ...], ...], np.ndarray]:
    """``(kept-scale tuples, probabilities [n] float32)`` a batch of this schedule draws from."""
    n = sched.num_scales
    if not options.var_len or sched.num_clips < 2:
        return (tuple(range(n)),), np.ones(1, np.float32)
    if options.var_len_outcomes is not None:
        outs = [tuple(sorted(int(s) for s in o)) for o in options.var_len_outcomes]
        bad = [o for o in outs if not o or max(o) >= n]
        if bad:
            raise ValueError(f"train.var_len_outcomes {bad} name scales beyond the {n}-scale schedule {sched.scales}")
    else:
        outs = [tuple(o) for o in schedules.var_len_outcomes(sched.num_clips, sched.scales_per_clip,
                                                               options.drop_720p_last_scale)]
    for o in outs:  # raises if an outcome drops a scale that a kept scale attends to
        schedules.remap_context(sched.context, o)
    return tuple(outs), options.probabilities(len(outs))


def entry_schedule(options: PackingOptions, entry: "IndexEntry") -> schedules.Schedule:
    """The schedule of a cache entry's shape group; its last scale must be the cached latent's size."""
    sched = resolve_schedule(options, entry.template, entry.pt)
    if tuple(sched.scales[-1][1:]) != (entry.h, entry.w):
        raise ValueError(f"cached latents of {entry.h}x{entry.w} (template {entry.template}, entry {entry.key}) do not "
                         f"match the schedule's last scale {sched.scales[-1]} for resolution={options.resolution}, "
                         f"num_scales={options.num_scales}; the cache was filled at another pixel level")
    return sched


def text_bucket(length: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if length <= b:
            return int(b)
    raise ValueError(f"a caption of {length} text tokens does not fit the largest text bucket {buckets[-1]}; "
                     "raise data.text_buckets")


@dataclasses.dataclass(frozen=True)
class StepShape:
    """Static shape of one train step (hashable: the key of its compiled function).

    ``scales``/``scales_per_clip``/``reps``: the example's full schedule; ``kept``: kept scale indices;
    ``text_slot``: text rows reserved per example; ``rows``: global batch rows.
    """

    scales: tuple[tuple[int, int, int], ...]
    scales_per_clip: int
    reps: tuple[int, ...]
    kept: tuple[int, ...]
    text_slot: int
    rows: int
    detail_scale_min_tokens: int
    pad_to_multiple: int = 128
    reweight_k: int = 4
    max_reweight: float = 40.0
    latent_dim: int = 64
    detail_bits: int = 64
    semantic_bits: int = 16
    noise_apply_layers: int = 1000

    def example(self, text_len: int | None = None) -> packing_lib.ExampleSpec:
        slot = self.text_slot if text_len is None else int(text_len)
        return packing_lib.ExampleSpec(self.scales, self.scales_per_clip, self.reps, self.kept, slot, slot,
                                       self.detail_scale_min_tokens)

    @functools.cached_property
    def packing(self) -> packing_lib.Packing:
        return packing_lib.pack([self.example()], self.pad_to_multiple, self.reweight_k, self.max_reweight)

    @functools.cached_property
    def plan(self) -> multiscale.Plan:
        """The multi-scale quantisation plan, cut after the last clip a kept scale belongs to (later clips do not
        influence any kept scale's input or label). Self-correction follows the full schedule (never the last
        scale of the *full* schedule)."""
        full = multiscale.Plan.from_schedule(
            self.scales, self.reps, self.scales_per_clip, self.detail_scale_min_tokens,
            semantic_dim=self.semantic_bits, detail_dim=self.detail_bits, latent_dim=self.latent_dim,
            noise_apply_layers=self.noise_apply_layers)
        n = (max(self.kept) // self.scales_per_clip + 1) * self.scales_per_clip
        if n == full.num_scales:
            return full
        return multiscale.Plan(scales=full.scales[:n], reps=full.reps[:n], frames=full.frames[:n],
                               clips=full.clips[:n], detail=full.detail[:n], bits=full.bits[:n],
                               self_correct=full.self_correct[:n], latent_dim=full.latent_dim)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """``(T, H, W, C)`` of the latent frames the step reads (the plan's clips)."""
        return (self.plan.latent_frames, *self.plan.full_hw, self.latent_dim)

    @property
    def length(self) -> int:
        return self.packing.length

    @property
    def visual_len(self) -> int:
        return self.packing.visual_len

    def describe(self) -> str:
        t, h, w = self.scales[-1]
        return (f"{len(self.scales)} scales to {t}x{h}x{w}, kept {_ranges(self.kept)}, text {self.text_slot}, "
                f"{self.rows} rows x {self.length} tokens ({self.visual_len} visual)")

    def to_json(self) -> dict:
        return {"scales": [list(s) for s in self.scales], "kept": list(self.kept), "text_slot": self.text_slot,
                "rows": self.rows, "length": self.length, "visual_len": self.visual_len}


def _ranges(xs: Sequence[int]) -> str:
    out, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ",".join(out)


def step_shape(options: PackingOptions, sched: schedules.Schedule, kept: Sequence[int], text_slot: int,
               rows: int) -> StepShape:
    return StepShape(
        scales=tuple(tuple(int(v) for v in s) for s in sched.scales), scales_per_clip=sched.scales_per_clip,
        reps=tuple(int(r) for r in sched.reps), kept=tuple(int(k) for k in kept), text_slot=int(text_slot),
        rows=int(rows), detail_scale_min_tokens=sched.detail_scale_min_tokens,
        pad_to_multiple=options.pad_to_multiple, reweight_k=options.reweight_k, max_reweight=options.max_reweight,
        latent_dim=options.latent_dim, detail_bits=options.detail_bits, semantic_bits=options.semantic_bits,
        noise_apply_layers=options.noise_apply_layers)


# ---- one row ---------------------------------------------------------------------------------------------------


def flip_probabilities(plan: multiscale.Plan, strength, rng: np.random.Generator) -> np.ndarray:
    """``[num_steps] float32``: per (scale, repetition) step ``randint(0, max(1, int(100·s + 1))) · 0.01``, 0 on
    scales without self-correction (SPEC §5). ``strength``: a float or a per-scale-index sequence."""
    per_scale = [float(strength)] * plan.num_scales if np.ndim(strength) == 0 else [float(s) for s in strength]
    if len(per_scale) < plan.num_scales:
        raise ValueError(f"noise_apply_strength has {len(per_scale)} entries; the schedule has {plan.num_scales} "
                         "scales")
    out = np.zeros(plan.num_steps, np.float32)
    for step in plan.steps:
        if plan.self_correct[step.si]:
            out[step.index] = rng.integers(0, max(1, int(100 * per_scale[step.si] + 1))) * 0.01
    return out


def row_arrays(shape: StepShape, latent: np.ndarray | None, text: np.ndarray | None, rng: np.random.Generator,
               options: PackingOptions) -> dict[str, np.ndarray]:
    """One packed row.

    Args:
      latent: ``[pt, h, w, C]`` (at least the plan's frames) or ``None`` for a zero-weight placeholder row.
      text: ``[n, D]`` text features (``n <= text_slot``) or ``None`` (placeholder).
    Returns (per row, no batch axis): ``latent [T, H, W, C] f32``, ``text [slot, D] f32``, ``uncond_rows [slot]
    int32`` (-1 = keep, else the ``cfg_uncond`` row), ``key_valid [L] bool``, ``positions [L, 4] int32``,
    ``repeat_idx [n_kept] int32``, ``flip_probs [num_steps] f32``, ``row_weight f32``, ``text_len int32``.
    """
    pk, plan = shape.packing, shape.plan
    t_lat, h, w, c = shape.latent_shape
    placeholder = latent is None
    if placeholder:
        latent = np.zeros((t_lat, h, w, c), np.float32)
        text = np.zeros((1, options.text_dim), np.float32)
    if latent.ndim != 4 or latent.shape[0] < t_lat or tuple(latent.shape[1:]) != (h, w, c):
        raise ValueError(f"latent of shape {latent.shape} does not fit the step shape {(t_lat, h, w, c)}")
    n = text.shape[0]
    if not 1 <= n <= shape.text_slot:
        raise ValueError(f"{n} text rows do not fit the text slot of {shape.text_slot}")
    text_pad = np.zeros((shape.text_slot, text.shape[1]), np.float32)
    text_pad[:n] = text
    repeat_idx = np.asarray([rng.integers(shape.reps[si]) for si in shape.kept], np.int32)
    flip_probs = flip_probabilities(plan, options.noise_strength, rng)
    drop = (not placeholder) and rng.random() < options.cond_drop
    uncond = np.where(np.arange(shape.text_slot) < n, np.arange(shape.text_slot), -1) if drop \
        else np.full(shape.text_slot, -1)
    key_valid = np.ones(pk.length, bool)
    off = pk.text_offsets[0]
    key_valid[off + n: off + shape.text_slot] = False
    if placeholder:
        repeat_idx[:] = 0
        flip_probs[:] = 0
    return {
        "latent": np.ascontiguousarray(latent[:t_lat], np.float32),
        "text": text_pad,
        "uncond_rows": uncond.astype(np.int32),
        "key_valid": key_valid,
        "positions": pk.positions([repeat_idx]),
        "repeat_idx": repeat_idx,
        "flip_probs": flip_probs,
        "row_weight": np.float32(0.0 if placeholder else 1.0),
        "text_len": np.int32(n),
    }


def stack_rows(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


# ---- the data index --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IndexEntry:
    """A usable cache entry: its key, shape group ``(template, pt, h, w)`` and caption length."""

    key: str
    template: float
    pt: int
    h: int
    w: int
    text_len: int

    @property
    def group(self) -> tuple[float, int, int, int]:
        return (self.template, self.pt, self.h, self.w)


@dataclasses.dataclass
class DataIndex:
    """The entries a run trains on, and the entries left out with their reasons."""

    entries: list[IndexEntry]
    dropped: collections.Counter

    def groups(self) -> dict[tuple, list[int]]:
        out: dict[tuple, list[int]] = collections.defaultdict(list)
        for i, e in enumerate(self.entries):
            out[e.group].append(i)
        return dict(sorted(out.items()))

    def save(self, path: str | os.PathLike) -> None:
        """Writes the index as JSON (a local path or any ``etils.epath`` URL), atomically where renames are."""
        path = epath.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{path.name}.tmp"
        tmp.write_text(json.dumps({"entries": [dataclasses.asdict(e) for e in self.entries],
                                   "dropped": dict(self.dropped)}))
        tmp.rename(path)

    @staticmethod
    def load(path: str | os.PathLike) -> "DataIndex":
        d = json.loads(epath.Path(path).read_text())
        return DataIndex([IndexEntry(**e) for e in d["entries"]], collections.Counter(d["dropped"]))


def index_entry(meta: Mapping[str, Any], rule: md.DurationRule, options: PackingOptions
                ) -> tuple[IndexEntry | None, str | None]:
    """``(entry, None)`` for a usable cache entry, ``(None, reason)`` otherwise (from its metadata only)."""
    shape = meta.get("latent_shape")
    if not shape or len(shape) != 4:
        return None, "cache_bad_meta"
    if meta.get("kind") == "image":
        pt = 1
    else:
        mapped, reason = rule.classify(meta["real_duration"])
        if mapped is None:
            return None, reason
        pt = schedules.latent_frames(rule.sample_frames(mapped))
    if shape[0] < pt:
        return None, "cache_too_short"
    if not meta.get("text_shape"):
        return None, "cache_no_text"
    text_len = int(meta["text_shape"][0])
    if text_len > min(options.text_maxlen, options.text_buckets[-1]) or text_len < 1:
        return None, "text_too_long" if text_len else "text_empty"
    return IndexEntry(meta["key"], float(meta["template"]), int(pt), int(shape[1]), int(shape[2]), text_len), None


def build_index(cache, rule: md.DurationRule, options: PackingOptions, *,
                threads: int = 16, progress: bool = False) -> DataIndex:
    """Reads every entry's metadata (in threads) and keeps the usable ones; checks the cache's latent and text
    widths against the model (a mismatch is a configuration error, not a bad sample)."""
    from tqdm import tqdm

    keys = cache.keys()
    if not keys:
        raise ValueError(f"the token cache {cache.root} has no entries; fill it first (infstar_jax.data.cache)")
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        metas = list(tqdm(pool.map(cache.read_meta, keys), total=len(keys), desc="index", unit="entry",
                          disable=not progress, leave=False))
    entries, dropped = [], collections.Counter()
    for meta in metas:
        c = meta["latent_shape"][-1] if meta.get("latent_shape") else None
        if c is not None and c != options.latent_dim:
            raise ValueError(f"token cache {cache.root}: entry {meta['key']} has {c}-channel latents, the model "
                             f"expects latent_dim={options.latent_dim}")
        d = meta["text_shape"][-1] if meta.get("text_shape") else None
        if d is not None and d != options.text_dim:
            raise ValueError(f"token cache {cache.root}: entry {meta['key']} has {d}-wide text features, the model "
                             f"expects text_dim={options.text_dim}")
        entry, reason = index_entry(meta, rule, options)
        if entry is None:
            dropped[reason] += 1
        else:
            entries.append(entry)
    if not entries:
        raise ValueError(f"no usable entries in {cache.root} (dropped: {dict(dropped)})")
    return DataIndex(entries, dropped)


# ---- the batch plan --------------------------------------------------------------------------------------------


class BatchPlan:
    """Global batches of entry ids (``PLACEHOLDER`` pads a group's last batch), ``batches_per_epoch`` per epoch.

    Batch ``i`` belongs to epoch ``i // batches_per_epoch``; an epoch's plan depends only on ``(seed, epoch)``.
    """

    def __init__(self, index: DataIndex, global_batch: int, seed: int, shuffle: bool = True):
        if global_batch < 1:
            raise ValueError(f"global batch size must be >= 1, got {global_batch}")
        self.index, self.global_batch, self.seed, self.shuffle = index, int(global_batch), int(seed), shuffle
        self._groups = list(index.groups().values())
        self.batches_per_epoch = sum(-(-len(g) // self.global_batch) for g in self._groups)

    @functools.lru_cache(maxsize=2)
    def epoch(self, e: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, 7, int(e)])
        batches = []
        for members in self._groups:
            order = rng.permutation(members) if self.shuffle else np.asarray(members)
            for s in range(0, len(order), self.global_batch):
                chunk = [int(x) for x in order[s: s + self.global_batch]]
                batches.append(chunk + [PLACEHOLDER] * (self.global_batch - len(chunk)))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __getitem__(self, i: int) -> list[int]:
        return self.epoch(i // self.batches_per_epoch)[i % self.batches_per_epoch]


# ---- loading batches -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class HostBatch:
    """One step's data on this process.

    ``index``: batch number (the step it feeds); ``shape``: the step shape; ``arrays``: this process's rows
    (``row_arrays`` stacked); ``keys``: their cache keys ('' for placeholders); ``skipped``: reasons of rows that
    could not be read (turned into placeholders); ``text_lens``: caption lengths of the whole global batch's real
    rows (from the index: identical on every process).
    """

    index: int
    shape: StepShape
    arrays: dict[str, np.ndarray]
    keys: list[str]
    skipped: list[str]
    text_lens: list[int]

    def keys_crc(self) -> int:
        """A checksum of this process's row keys (data-order checks in logs and tests)."""
        return zlib.crc32("|".join(self.keys).encode())


class BatchLoader:
    """Batch number -> ``HostBatch`` (called from grain's reader threads)."""

    def __init__(self, cache, index: DataIndex, plan: BatchPlan, options: PackingOptions,
                 rule: md.DurationRule, seed: int, process_index: int, process_count: int):
        from infstar_jax.data import cache as cache_mod
        from infstar_jax.data import pipeline as pl

        self._pl = pl
        if plan.global_batch % process_count:
            raise ValueError(f"global batch {plan.global_batch} is not divisible by {process_count} processes")
        self.index, self.plan, self.options, self.seed = index, plan, options, int(seed)
        self.process_index, self.process_count = process_index, process_count
        self.local = plan.global_batch // process_count
        self.source = cache_mod.CacheSource(cache, [e.key for e in index.entries])
        self.data_options = pl.DataOptions(rule=rule)

    def shape_of(self, i: int, ids: Sequence[int]) -> StepShape:
        real = [self.index.entries[j] for j in ids if j != PLACEHOLDER]
        sched = entry_schedule(self.options, real[0])
        outs, probs = outcomes(self.options, sched)
        k = int(np.random.default_rng([self.seed, 1, i]).choice(len(outs), p=probs)) if len(outs) > 1 else 0
        slot = text_bucket(max(e.text_len for e in real), self.options.text_buckets)
        return step_shape(self.options, sched, outs[k], slot, self.plan.global_batch)

    def __call__(self, i: int) -> HostBatch:
        pl = self._pl
        ids = self.plan[i]
        shape = self.shape_of(i, ids)
        lo = self.process_index * self.local
        rows, keys, skipped = [], [], []
        for r in range(lo, lo + self.local):
            rng = np.random.default_rng([self.seed, 2, i, r])
            j = ids[r]
            latent = text = None
            if j != PLACEHOLDER:
                entry = self.index.entries[j]
                got = pl.decode_cached(self.source, j, rng, self.data_options, use_cached_text=True)
                if isinstance(got, pl.Skipped):
                    skipped.append(got.reason)
                    log.warning("batch %d: %s (%s): %s", i, got.origin, got.reason, got.message)
                elif got["latent"].shape[:3] != (entry.pt, entry.h, entry.w) or got["text"].shape[0] != entry.text_len:
                    skipped.append("cache_changed")
                    log.warning("batch %d: entry %s changed since the data index was built", i, entry.key)
                else:
                    latent, text = got["latent"], got["text"]
            rows.append(row_arrays(shape, latent, text, rng, self.options))
            keys.append(self.index.entries[j].key if latent is not None else "")
        text_lens = [self.index.entries[j].text_len for j in ids if j != PLACEHOLDER]
        return HostBatch(i, shape, stack_rows(rows), keys, skipped, text_lens)


@functools.cache
def _iterator_class():
    # grain is imported on first use only: the step and the benchmark need none of the data stack.
    import grain

    class BatchIterator(grain.DatasetIterator):
        """Iterator of ``HostBatch``es with a JSON state (next batch number + skip counts, counted when a batch is
        consumed, so prefetching never counts ahead of the saved state)."""

        def __init__(self, parent, skipped):
            super().__init__(parent)
            self.skipped = skipped

        def __next__(self) -> HostBatch:
            batch = next(self._parent)
            for reason in batch.skipped:
                self.skipped.add(reason)
            return batch

        def get_state(self) -> dict:
            return {"parent": self._parent.get_state(), "skipped": self.skipped.counts()}

        def set_state(self, state: dict) -> None:
            self._parent.set_state(state["parent"])
            self.skipped.restore(state["skipped"])

    return BatchIterator


@dataclasses.dataclass
class BatchSource:
    """Everything a run needs to iterate its data: the loader, the plan, and the iterator factory."""

    loader: BatchLoader
    plan: BatchPlan
    index: DataIndex
    num_threads: int = 2
    prefetch: int = 2

    def iterator(self):
        """A checkpointable ``grain.DatasetIterator`` of ``HostBatch``es from batch 0, with a ``skipped`` counter."""
        import grain

        from infstar_jax.data import pipeline as pl

        ds = grain.MapDataset.range(10**15).map(self.loader)
        read = grain.ReadOptions(num_threads=self.num_threads, prefetch_buffer_size=self.prefetch)
        return _iterator_class()(iter(ds.to_iter_dataset(read)), pl.SkipCounter(self.index.dropped))


def possible_shapes(index: DataIndex, options: PackingOptions, global_batch: int) -> list[StepShape]:
    """Every step shape the data can produce (see the module docstring): the compiled step variants."""
    out = []
    for members in index.groups().values():
        sched = entry_schedule(options, index.entries[members[0]])
        outs, _ = outcomes(options, sched)
        slots = sorted({text_bucket(index.entries[j].text_len, options.text_buckets) for j in members})
        out.extend(step_shape(options, sched, kept, slot, global_batch) for kept in outs for slot in slots)
    return out


def batch_source(cache_root: str, options: PackingOptions, rule: md.DurationRule, *, global_batch: int, seed: int,
                 index_path: str | None = None, shuffle: bool = True, num_threads: int = 2, prefetch: int = 2,
                 process_index: int = 0, process_count: int = 1, progress: bool = False) -> BatchSource:
    """A ``BatchSource`` over a token cache; the data index is read from ``index_path`` if it exists, else built
    from the cache and written there."""
    from infstar_jax.data import cache as cache_mod

    cache = cache_mod.TokenCache(cache_root)
    if index_path and epath.Path(index_path).exists():
        index = DataIndex.load(index_path)
        log.info("data index %s: %d entries", index_path, len(index.entries))
    else:
        index = build_index(cache, rule, options, progress=progress)
        if index_path and process_index == 0:
            index.save(index_path)
    plan = BatchPlan(index, global_batch, seed, shuffle)
    loader = BatchLoader(cache, index, plan, options, rule, seed, process_index, process_count)
    return BatchSource(loader, plan, index, num_threads, prefetch)
