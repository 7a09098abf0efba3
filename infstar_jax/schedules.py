"""Scale schedules of InfinityStar: spatial pyramids, clip pyramids, repetitions, context (reference) tables, RoPE
positions, loss weights and the training var-len outcomes.

Pure numpy (no jax): the transformer, the tokenizer's multi-scale quantiser, the sampler and the trainer all build on
it. Everything here is integer bookkeeping except two places where float rounding must follow the reference exactly:

* the spatial pyramid, ``ph = round(pw_float * r)`` with numpy's half-to-even rounding on float64 values;
* the normalised RoPE row/column indices, ``round_half_even(arange(p) * float32(up / p))`` computed in **float32**
  (SPEC §10.2: float64 gives a different index for template 0.494 at 0.40M).

Vocabulary (SPEC §3): a *scale* is one ``(pt, ph, pw)`` latent grid; ``N = scales_per_clip`` scales form the image
pyramid (clip 0, pt = 1) and every video clip pyramid (pt = 20 latent frames, or fewer for a partial last clip); a
scale with repetition ``r`` is forwarded ``r`` times, each forward being one autoregressive *step* with its own RoPE
scale-axis index ``real_sid``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from functools import lru_cache

import numpy as np

SCALE_SIDES = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32, 40, 60)
# h/w of the 8 base aspect ratios, in the reference's order (dict order decides template ties).
BASE_RATIOS = (1.0, 100 / 116, 3 / 4, 2 / 3, 9 / 16, 1 / 2, 2 / 5, 1 / 3)
PIXEL_LEVELS = {"0.06M": 11, "0.25M": 13, "0.40M": 14, "0.90M": 15}
RESOLUTIONS = {"480p": "0.40M", "720p": "0.90M"}
FRAMES_PER_CLIP = 20  # latent frames per video clip (80 video frames = 5 s at 16 fps)
TEXT_MAXLEN = 512
FPS = 16
TEMPORAL_STRIDE = 4  # video frames per latent frame (after the first)
SPATIAL_STRIDE = 16  # pixels per latent row/column
DEFAULT_VIDEO_FRAMES = 161  # covers every duration the released scripts can request (SPEC §3.2, golden note)

_RELEASED = {
    "0.40M": dict(
        image_rep=(3,) * 14, video_rep=(3,) * 12 + (2, 1), semantic_scales=11, detail_scale_min_tokens=350,
        tau_image=1.0, tau_video=0.4, cfg=34, guidance="apg", apg_norm_threshold=0.05,
    ),
    "0.90M": dict(
        image_rep=(3,) * 15, video_rep=(3,) * 12 + (2, 1, 1), semantic_scales=12, detail_scale_min_tokens=750,
        tau_image=1.0, tau_video=0.4, cfg=34, guidance="apg", apg_norm_threshold=0.05,
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# Spatial pyramids and templates (SPEC §3.1)
# ----------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _ratio2hws() -> tuple[tuple[float, tuple[tuple[int, int], ...]], ...]:
    out = []
    for r in BASE_RATIOS:
        pairs = []
        for s in SCALE_SIDES:
            pw_float = math.sqrt(s * s / r)
            ph_float = pw_float * r
            # np.round on float64 = half-to-even, exactly what the reference calls.
            pairs.append((int(np.round(ph_float)), int(np.round(pw_float))))
        out.append((r, tuple(pairs)))
    return tuple(out)


def ratio2hws() -> dict[float, list[tuple[int, int]]]:
    """The 8 base aspect ratios (h/w) -> their 15 (ph, pw) pairs, one per entry of SCALE_SIDES."""
    return {r: list(pairs) for r, pairs in _ratio2hws()}


@lru_cache(maxsize=None)
def _template_table() -> tuple[tuple[float, tuple[tuple[int, int], ...]], ...]:
    # Keys come from the 15th pair (not the pair a pixel level ends at) and, for the transposed list, from
    # 1/(h/w) rather than w/h: both as the reference computes them, so the float keys are identical.
    table: dict[float, tuple[tuple[int, int], ...]] = {}
    for r, pairs in _ratio2hws():
        real_ratio = pairs[-1][0] / pairs[-1][1]
        table[int(real_ratio * 1000) / 1000] = pairs
        if r != 1.0:
            table[int(1 / real_ratio * 1000) / 1000] = tuple((w, h) for h, w in pairs)
    return tuple(table.items())


def templates() -> list[float]:
    """The 15 h/w templates in the reference's dict order (0.562 is 16:9 landscape, 1.777 its portrait)."""
    return [k for k, _ in _template_table()]


def nearest_template(h_div_w: float) -> float:
    """Template nearest to ``h_div_w`` by |h/w - key| (first in dict order on ties, like np.argmin)."""
    h_div_w = float(h_div_w)
    if not math.isfinite(h_div_w) or h_div_w <= 0:
        raise ValueError(f"h/w ratio must be a positive finite number, got {h_div_w!r}")
    keys = np.array(templates())
    return float(keys[int(np.argmin(np.abs(h_div_w - keys)))])


def _check_template(template: float) -> float:
    template = float(template)
    if template not in templates():
        raise ValueError(
            f"unknown h/w template {template!r}; templates are {templates()} "
            f"(nearest_template({template!r}) = {nearest_template(template) if template > 0 else 'n/a'})")
    return template


def _check_num_scales(num_scales) -> int:
    if isinstance(num_scales, str):
        if num_scales not in PIXEL_LEVELS:
            raise ValueError(f"unknown pixel level {num_scales!r}; expected one of {sorted(PIXEL_LEVELS)}")
        return PIXEL_LEVELS[num_scales]
    if isinstance(num_scales, bool) or int(num_scales) != num_scales or not 1 <= num_scales <= len(SCALE_SIDES):
        raise ValueError(f"num_scales must be an integer in [1, {len(SCALE_SIDES)}], got {num_scales!r}")
    return int(num_scales)


def spatial_pyramid(template: float, num_scales: int | str = 15) -> list[tuple[int, int]]:
    """The first ``num_scales`` (ph, pw) pairs of a template (``num_scales`` may be a pixel level like "0.40M")."""
    table = dict(_template_table())
    return list(table[_check_template(template)][: _check_num_scales(num_scales)])


def pixel_hw(template: float, num_scales: int | str, stride: int = SPATIAL_STRIDE) -> tuple[int, int]:
    """Output video size (H, W) in pixels: ``stride`` (the tokenizer's pixels per latent position, 16 for the
    release) x the last used pair."""
    ph, pw = spatial_pyramid(template, num_scales)[-1]
    return ph * stride, pw * stride


# ----------------------------------------------------------------------------------------------------------------
# Frames and clip pyramids (SPEC §3.2)
# ----------------------------------------------------------------------------------------------------------------


def latent_frames(num_frames: int) -> int:
    """Latent frames of a video of ``num_frames`` frames: 1 + (T-1)//4 (the causal VAE's temporal stride)."""
    if isinstance(num_frames, bool) or int(num_frames) != num_frames or num_frames < 1:
        raise ValueError(f"number of frames must be a positive integer, got {num_frames!r}")
    num_frames = int(num_frames)
    if num_frames % TEMPORAL_STRIDE != 1:
        raise ValueError(
            f"number of frames must be 4k+1 (1, 5, 9, ..., 81, ..., 161) for the causal VAE, got {num_frames}")
    return 1 + (num_frames - 1) // TEMPORAL_STRIDE


def video_frames_for(pt: int) -> int:
    """Video frames of ``pt`` latent frames: 4(pt-1)+1."""
    return TEMPORAL_STRIDE * (pt - 1) + 1


def pt2scale_schedule(template: float, num_scales: int | str,
                      video_frames: int = DEFAULT_VIDEO_FRAMES) -> dict[int, list[tuple[int, int, int]]]:
    """Schedules for every latent length the reference offers: {1: image pyramid, 5: ..., 9: ..., ..., pt_max}.

    ``video_frames`` must give a whole number of 20-latent-frame clips ((video_frames//4) % 20 == 0, e.g. 81, 161);
    pt = 1 + 4k in 1-second steps; a partial last clip has the remaining latent frames as its pt.
    """
    spatial = spatial_pyramid(template, num_scales)
    compressed = int(video_frames) // TEMPORAL_STRIDE + 1
    if video_frames < 1 or (compressed - 1) % FRAMES_PER_CLIP:
        raise ValueError(
            f"video_frames={video_frames!r} does not give whole 20-latent-frame clips; use 80k+1 (81, 161, 241, ...)")
    image = [(1, h, w) for h, w in spatial]
    out = {1: image}
    for pt in range(5, compressed + 1, 4):
        out[pt] = _clip_schedule(image, pt)
    return out


def _clip_schedule(image: list[tuple[int, int, int]], pt: int) -> list[tuple[int, int, int]]:
    n_video_clips = math.ceil((pt - 1) / FRAMES_PER_CLIP)
    sched = list(image)
    for k in range(n_video_clips):
        last = k == n_video_clips - 1
        t = (pt - 1) - FRAMES_PER_CLIP * k if last else FRAMES_PER_CLIP
        sched.extend((t, h, w) for _, h, w in image)
    return sched


def _supported_pts_text() -> str:
    return "1 (image) or 1+4k latent frames (5, 9, 13, ..., 21, 25, ..., 41, ...), i.e. 16*seconds+1 video frames"


def scale_schedule(template: float, num_scales: int | str, pt: int) -> list[tuple[int, int, int]]:
    """Schedule for ``pt`` latent frames: the image pyramid, then one clip pyramid per (started) 20 latent frames.

    Same as ``pt2scale_schedule(template, num_scales, video_frames)[pt]`` for any long enough ``video_frames``.
    """
    image = [(1, h, w) for h, w in spatial_pyramid(template, num_scales)]
    if isinstance(pt, bool) or int(pt) != pt or pt < 1 or (pt - 1) % 4:
        raise ValueError(f"no schedule for pt={pt!r} latent frames; supported: {_supported_pts_text()}")
    pt = int(pt)
    return image if pt == 1 else _clip_schedule(image, pt)


def first_full_scale_index(schedule) -> int:
    """First scale whose (h, w) equals the last scale's (= N-1): the end of the image pyramid."""
    last = tuple(schedule[-1][1:])
    return next(si for si, s in enumerate(schedule) if tuple(s[1:]) == last)


def scales_per_clip_of(schedule) -> int:
    """N of a schedule (reference: first_full_spatial_size_scale_index + 1)."""
    return first_full_scale_index(schedule) + 1


# ----------------------------------------------------------------------------------------------------------------
# Context (reference) table, repetitions, step indices (SPEC §3.4-3.6)
# ----------------------------------------------------------------------------------------------------------------


def context_info(schedule, scales_per_clip: int, frames_inner_clip: int = FRAMES_PER_CLIP) -> list[dict]:
    """Per scale: clip id, RoPE frame range [frame_ss, frame_ee) and referenced scales (released settings).

    Released args (context_from_largest_no=1, context_interval=2, context_frames=10000): clip 0 references nothing,
    clip k >= 1 references the last (full-resolution) scale of clip k-1. Frames: clip 0 -> [0, pt of its last
    scale); clip k -> starts at pt(scale 0) + (k-1)*frames_inner_clip and spans the pt of its own last scale.
    """
    n = int(scales_per_clip)
    if n < 1 or len(schedule) % n:
        raise ValueError(f"schedule of {len(schedule)} scales is not a whole number of {n}-scale clips")
    out = []
    for si in range(len(schedule)):
        clip = si // n
        last_pt = schedule[n * (clip + 1) - 1][0]
        if clip == 0:
            ss = 0
        else:
            ss = schedule[0][0] + (clip - 1) * frames_inner_clip
        refs = [n * clip - 1] if clip >= 1 else []
        out.append({"clipid": clip, "frame_ss": ss, "frame_ee": ss + last_pt, "ref_sids": refs})
    return out


def default_repetitions(num_scales: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Released repetition pattern for an N-scale pyramid: image [3]*N, video [3]*(N-2)+[2,1] (golden tinyN)."""
    image = (3,) * num_scales
    video = ((3,) * max(num_scales - 2, 0) + (2, 1))[-num_scales:]
    return image, video


def repetitions(schedule, scales_per_clip: int, image_rep, video_rep) -> list[int]:
    """rep(si) = image_rep[si] for clip 0, video_rep[si % N] otherwise (SPEC §3.4)."""
    n = int(scales_per_clip)
    image_rep, video_rep = [int(r) for r in image_rep], [int(r) for r in video_rep]
    for name, reps in (("image_rep", image_rep), ("video_rep", video_rep)):
        if len(reps) != n:
            raise ValueError(f"{name} has {len(reps)} entries, expected one per scale of a clip ({n}): {reps}")
        if any(r < 1 for r in reps):
            raise ValueError(f"{name} entries must be >= 1, got {reps}")
    return [image_rep[si] if si < n else video_rep[si % n] for si in range(len(schedule))]


def real_sid_starts(reps) -> list[int]:
    """Cumulative step index of each scale's repetition 0: real_sid(si, r) = starts[si] + r (SPEC §3.5)."""
    return [int(x) for x in np.concatenate([[0], np.cumsum(np.asarray(reps, dtype=np.int64))[:-1]])]


def tau_list(schedule, scales_per_clip: int, tau_image: float, tau_video: float) -> list[float]:
    """Sampling temperature per scale: tau_image for the image pyramid, tau_video for every video scale."""
    n = int(scales_per_clip)
    return [float(tau_image)] * min(n, len(schedule)) + [float(tau_video)] * (len(schedule) - n)


# ----------------------------------------------------------------------------------------------------------------
# RoPE positions (SPEC §1.6, Appendix B, §10.2)
# ----------------------------------------------------------------------------------------------------------------


def normalized_positions(p: int, up: int) -> np.ndarray:
    """Row (or column) RoPE indices of a p-long axis inside the schedule's largest size ``up``: [p] int32.

    round_half_even(arange(p) * float32(up / p)) in float32, as torch computes `(arange(p) * (up/p)).round()`.
    """
    prod = np.arange(p, dtype=np.float32) * np.float32(up / p)
    return np.rint(prod).astype(np.int32)


def visual_rope_positions(scale, largest_hw, real_sid: int, frame_ss: int,
                          text_maxlen: int = TEXT_MAXLEN) -> np.ndarray:
    """(scale-step, frame, row, col) position of every token of one step: [pt*ph*pw, 4] int32, row-major (t, y, x).

    scale-step = text_maxlen + real_sid (the reference slices its scale table at text_maxlen); frame = frame_ss + t;
    row/col = normalized_positions against the largest scale (largest_hw = (H, W) of the schedule's last scale).
    """
    pt, ph, pw = (int(v) for v in scale)
    uph, upw = (int(v) for v in largest_hw)
    t, y, x = np.meshgrid(np.arange(pt), np.arange(ph), np.arange(pw), indexing="ij")
    pos = np.empty((pt, ph, pw, 4), dtype=np.int32)
    pos[..., 0] = text_maxlen + int(real_sid)
    pos[..., 1] = int(frame_ss) + t
    pos[..., 2] = normalized_positions(ph, uph)[y]
    pos[..., 3] = normalized_positions(pw, upw)[x]
    return pos.reshape(pt * ph * pw, 4)


def text_rope_positions(n: int) -> np.ndarray:
    """Text token i of a prompt sits at (i, 0, 0, 0): [n, 4] int32."""
    pos = np.zeros((int(n), 4), dtype=np.int32)
    pos[:, 0] = np.arange(int(n))
    return pos


# ----------------------------------------------------------------------------------------------------------------
# Heads, loss weights, var-len outcomes
# ----------------------------------------------------------------------------------------------------------------


def head_is_detail(ph: int, pw: int, detail_scale_min_tokens: int) -> bool:
    """Quantiser (and training-head) rule: a scale is 'detail' (64 bits) iff ph*pw >= detail_scale_min_tokens."""
    return int(ph) * int(pw) >= int(detail_scale_min_tokens)


def loss_weights_unnormalised(volumes, v_max, k: int = 4, max_value: float = 40.0) -> np.ndarray:
    """Per kept scale: w = V * min(max_value, (V_max/V)^(1/(1+k))) in float64 (k = 0: w = V). [n] float64.

    ``v_max`` is the volume of the last scale of each block's own full schedule (scalar or one per block).
    """
    v = np.asarray(volumes, dtype=np.float64)
    if k == 0:
        return v.copy()
    ratio = np.asarray(v_max, dtype=np.float64) / v
    return np.minimum(float(max_value), np.power(ratio, 1.0 / (1 + k))) * v


def loss_weights(volumes, v_max, k: int = 4, max_value: float = 40.0) -> np.ndarray:
    """Normalised per-scale loss weights (SPEC §7.6): [n] float32 summing to 1.

    The trainer turns the float64 weights into a float32 tensor and divides by its float32 sum; so do we.
    """
    w = loss_weights_unnormalised(volumes, v_max, k, max_value).astype(np.float32)
    return w / w.sum(dtype=np.float32)


def var_len_outcomes(num_clips: int, scales_per_clip: int, drop_720p_last_scale: bool = True) -> list[list[int]]:
    """Kept-scale lists the released trainer draws from (SPEC §7.3), in the reference's order.

    A 3-clip schedule (10 s) has 11 outcomes; any other multi-clip schedule uses the 5 s list (6 outcomes with
    drop_720p_last_scale, else 7). Raises when an outcome names a scale the schedule does not have (the reference
    would crash when drawing it): image-only schedules and pyramids with fewer than 14-15 scales.
    """
    s, num_clips = int(scales_per_clip), int(num_clips)
    if num_clips < 2:
        raise ValueError("var-len outcomes need a video schedule (>= 2 clips); the released trainer cannot train "
                         f"an image-only schedule through this branch (got {num_clips} clip)")
    r = lambda a, b: list(range(a, b))  # noqa: E731
    if num_clips == 3:
        outs = [
            r(0, s), r(0, s + 8), r(0, s + 11), r(0, s + 11) + [s + 11], r(0, s + 11) + [s + 12],
            r(0, s + 11) + [s + 13],
            [s - 1, 2 * s - 1] + r(2 * s, 2 * s + 11), [s - 1, 2 * s - 1] + r(2 * s, 2 * s + 11),
            [s - 1, 2 * s - 1, 2 * s + 11], [s - 1, 2 * s - 1, 2 * s + 12], [s - 1, 2 * s - 1, 2 * s + 13],
        ]
    elif drop_720p_last_scale:
        outs = [r(0, s), r(0, s + 8), r(0, s + 11), r(0, s + 11) + [s + 11], r(0, s + 11) + [s + 12],
                r(0, s + 8) + [s + 13]]
    else:
        outs = [r(0, s), r(0, s + 8), r(0, s + 11), r(0, s + 11) + [s + 11], r(0, s + 11) + [s + 12],
                [s - 1, s + 13], [s - 1, s + 14]]
    n_scales = num_clips * s
    bad = [o for o in outs if max(o) >= n_scales]
    if bad:
        raise ValueError(f"var-len outcomes {bad} name scales beyond the {n_scales}-scale schedule "
                         f"({num_clips} clips x {s} scales, drop_720p_last_scale={drop_720p_last_scale})")
    return outs


def var_len_probabilities(video_var_len_prob, n_outcomes: int) -> np.ndarray:
    """The first n_outcomes probabilities, normalised in float32 as the reference does: [n_outcomes] float32."""
    p = np.asarray(video_var_len_prob, dtype=np.float32)[: int(n_outcomes)]
    if p.size != n_outcomes or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"need {n_outcomes} non-negative probabilities with a positive sum, got {video_var_len_prob}")
    return p / p.sum()


def remap_context(context, kept) -> list[list[int]]:
    """ref_sids of the kept scales, renumbered to positions in ``kept`` (sorted); raises if a reference was dropped."""
    kept = sorted(int(k) for k in kept)
    new_index = {si: i for i, si in enumerate(kept)}
    out = []
    for si in kept:
        refs = context[si]["ref_sids"]
        missing = [r for r in refs if r not in new_index]
        if missing:
            raise ValueError(f"scale {si} references scales {missing} that are not kept ({kept})")
        out.append([new_index[r] for r in refs])
    return out


# ----------------------------------------------------------------------------------------------------------------
# Steps and the resolved schedule
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Step:
    """One visual AR step (one repetition of one scale).

    ``detail``/``bits``: quantiser rule (ph*pw >= detail_scale_min_tokens), which decides the BSQ (16 or 64 bits)
    and, in training, the head. ``head_detail``: inference head rule (rel_si >= semantic_scales); ``resolve``
    refuses settings where the two disagree unless asked not to.
    """

    index: int  # visual step, 0-based (the text step is not counted)
    si: int  # scale index in the schedule
    rep: int  # repetition index of this scale
    real_sid: int  # RoPE scale-axis index (position TEXT_MAXLEN + real_sid)
    clip: int  # si // N
    rel_si: int  # si % N
    shape: tuple[int, int, int]  # (pt, ph, pw)
    tokens: int  # pt*ph*pw
    last_rep: bool  # only the last repetition's K/V are cached for later steps
    ref_sids: tuple[int, ...]  # cached scales this step attends to besides text and itself
    frame_ss: int
    frame_ee: int
    detail: bool
    bits: int  # 64 detail / 16 semantic
    repeats: int  # repetitions of this scale
    head_detail: bool
    zero_input: bool  # first step of a clip: all-zero input (tokens = word_embed.bias)
    accum_shape: tuple[int, int, int]  # resolution of the clip's accumulated code (target_pn)
    tau: float
    ref_tokens: int  # K/V tokens contributed by ref_sids
    ref_steps: tuple[int, ...]  # step index whose cached K/V serve each ref (last repetition of the ref scale)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Everything the sampler and the trainer need for one request."""

    scales: tuple[tuple[int, int, int], ...]
    scales_per_clip: int
    reps: tuple[int, ...]
    template: float
    pixel_hw: tuple[int, int]
    num_frames: int
    semantic_scales: int
    detail_scale_min_tokens: int
    tau: tuple[float, ...]
    context: tuple[dict, ...]

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @property
    def num_clips(self) -> int:
        return len(self.scales) // self.scales_per_clip

    @property
    def latent_frames(self) -> int:
        return sum(self.scales[c * self.scales_per_clip][0] for c in range(self.num_clips))

    @property
    def is_image(self) -> bool:
        return self.num_clips == 1

    @property
    def largest(self) -> tuple[int, int, int]:
        return tuple(self.scales[-1])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(T_lat, H, W) of the full latent (the VAE decoder input without channels)."""
        return (self.latent_frames, self.scales[-1][1], self.scales[-1][2])

    @property
    def real_sid_starts(self) -> tuple[int, ...]:
        return tuple(real_sid_starts(self.reps))

    @property
    def num_steps(self) -> int:
        return int(sum(self.reps))

    @property
    def total_tokens(self) -> int:
        return int(sum(t * h * w for t, h, w in self.scales))

    def accum_shape(self, si: int) -> tuple[int, int, int]:
        """Resolution of the accumulated code scale si adds into: the image's last scale, or the schedule's last."""
        n = self.scales_per_clip
        return tuple(self.scales[n - 1] if si < n else self.scales[-1])

    def rope_positions(self, si: int, rep: int = 0, text_maxlen: int = TEXT_MAXLEN) -> np.ndarray:
        """[pt*ph*pw, 4] int32 RoPE positions of repetition ``rep`` of scale ``si``."""
        return visual_rope_positions(self.scales[si], self.largest[1:], self.real_sid_starts[si] + rep,
                                     self.context[si]["frame_ss"], text_maxlen)

    def head_mismatch(self) -> list[int]:
        """rel_si whose inference head (index rule) differs from the quantiser rule (token-count rule)."""
        n = self.scales_per_clip
        return [r for r in range(n) if (r >= self.semantic_scales)
                != head_is_detail(*self.scales[r][1:], self.detail_scale_min_tokens)]

    def gt_leak(self, mode: str) -> int:
        """Number of leading scales whose bits are teacher-forced (SPEC §6.6): t2v/t2i 0, i2v N, v2v 2N."""
        n = self.scales_per_clip
        if mode in ("t2v", "t2i"):
            return 0
        if mode == "i2v":
            if self.is_image:
                raise ValueError("image-to-video needs a video schedule (duration > 0)")
            return n
        if mode == "v2v":
            if self.num_clips < 3:
                raise ValueError("video continuation conditions on the first 5 s, so it needs at least 2 video "
                                 f"clips (10 s); this schedule has {self.num_clips - 1}")
            return 2 * n
        raise ValueError(f"unknown generation mode {mode!r}; expected one of t2v, t2i, i2v, v2v")

    def steps(self) -> list[Step]:
        """Visual AR steps in order (the text step is excluded)."""
        n = self.scales_per_clip
        starts = self.real_sid_starts
        last_step = [starts[si] + self.reps[si] - 1 for si in range(len(self.scales))]
        out = []
        for si, shape in enumerate(self.scales):
            shape = tuple(int(v) for v in shape)
            pt, ph, pw = shape
            ctx = self.context[si]
            refs = tuple(ctx["ref_sids"])
            detail = head_is_detail(ph, pw, self.detail_scale_min_tokens)
            clip_start = si == 0 or tuple(self.scales[si - 1][1:]) == tuple(self.scales[-1][1:])
            for r in range(self.reps[si]):
                out.append(Step(
                    index=starts[si] + r, si=si, rep=r, real_sid=starts[si] + r, clip=si // n, rel_si=si % n,
                    shape=shape, tokens=pt * ph * pw, last_rep=r == self.reps[si] - 1, ref_sids=refs,
                    frame_ss=ctx["frame_ss"], frame_ee=ctx["frame_ee"], detail=detail, bits=64 if detail else 16,
                    repeats=self.reps[si], head_detail=(si % n) >= self.semantic_scales,
                    zero_input=clip_start and r == 0, accum_shape=self.accum_shape(si), tau=self.tau[si],
                    ref_tokens=int(sum(int(np.prod(self.scales[j])) for j in refs)),
                    ref_steps=tuple(last_step[j] for j in refs),
                ))
        return out


def released(resolution: str) -> dict:
    """Released inference settings (SPEC §6.1) for "480p"/"720p" (or "0.40M"/"0.90M").

    Keys: pixel_level, num_scales, image_rep, video_rep, semantic_scales, detail_scale_min_tokens, tau_image,
    tau_video, cfg (guidance scale), guidance ("apg"), apg_norm_threshold.
    """
    level = _pixel_level(resolution)
    if level not in _RELEASED:
        raise ValueError(f"no released settings for {resolution!r}; released: {sorted(RESOLUTIONS)} "
                         f"(= {sorted(_RELEASED)})")
    out = dict(_RELEASED[level])
    out.update(pixel_level=level, num_scales=PIXEL_LEVELS[level],
               image_rep=list(out["image_rep"]), video_rep=list(out["video_rep"]))
    return out


def _pixel_level(resolution: str) -> str:
    if isinstance(resolution, str):
        if resolution in RESOLUTIONS:
            return RESOLUTIONS[resolution]
        if resolution in PIXEL_LEVELS:
            return resolution
    raise ValueError(f"unknown resolution {resolution!r}; supported: {sorted(RESOLUTIONS)} "
                     f"or pixel levels {sorted(PIXEL_LEVELS)} (released settings exist for 480p and 720p)")


def parse_aspect(aspect) -> float:
    """Aspect as h/w: "16:9" / "16x9" (width:height) -> 9/16; a number (or numeric string) is taken as h/w."""
    if isinstance(aspect, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*[:xX]\s*(\d+(?:\.\d+)?)\s*", aspect)
        if m:
            w, h = float(m.group(1)), float(m.group(2))
            if w > 0 and h > 0:
                return h / w
        else:
            try:
                value = float(aspect)
            except ValueError:
                value = None
            if value is not None and math.isfinite(value) and value > 0:
                return value
        raise ValueError(f"cannot parse aspect {aspect!r}; expected 'W:H' like '16:9', '1:1', '9:16', "
                         "or an h/w number like 0.5625")
    if isinstance(aspect, (int, float, np.floating, np.integer)) and not isinstance(aspect, bool):
        if math.isfinite(float(aspect)) and aspect > 0:
            return float(aspect)
    raise ValueError(f"aspect must be 'W:H' (e.g. '16:9') or a positive h/w number, got {aspect!r}")


def _frames_from_duration(duration) -> int:
    if isinstance(duration, bool) or not isinstance(duration, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(duration)) or duration < 0 or float(duration) != int(duration):
        raise ValueError(f"duration must be a whole number of seconds >= 0 (0 = image; 1-5, 10, 15, ... for "
                         f"video), got {duration!r}")
    return FPS * int(duration) + 1


def _sampler_can_run(pt: int) -> bool:
    # A partial clip is fine only as the first video clip: the sampler upsamples every clip to the last clip's
    # shape, so a partial clip after a full one mixes 20- and <20-frame tensors (SPEC §10.5).
    return pt == 1 or pt <= 1 + FRAMES_PER_CLIP or (pt - 1) % FRAMES_PER_CLIP == 0


def resolve(resolution: str = "480p", aspect=None, duration=5, frames: int | None = None, *,
            height: int | None = None, width: int | None = None, num_scales: int | None = None,
            image_rep=None, video_rep=None, semantic_scales: int | None = None,
            detail_scale_min_tokens: int | None = None, tau_image: float | None = None,
            tau_video: float | None = None, training: bool = False, strict_heads: bool = True) -> Schedule:
    """Turn a request ("480p, 16:9, 5 s" or explicit height/width/frames) into a Schedule.

    * aspect: "W:H" string or h/w number (default "16:9"); height/width, when given, set h/w instead. The template
      is the one nearest to h/w; the output size is the template's ``pixel_hw`` (inputs are resized/cropped to it).
    * duration (seconds, 16 fps; 0 = image) or frames (video frames, 4k+1; 1 = image; overrides duration).
    * Released settings of the resolution unless overridden; ``num_scales`` truncates the pyramid (tiny test
      pyramids), in which case repetitions default to image [3]*N, video [3]*(N-2)+[2,1].
    * training=True also accepts partial last clips after a full clip (25, 29, ... latent frames), which the
      trainer handles but the sampler cannot run (SPEC §10.5).
    * strict_heads: refuse semantic_scales/detail_scale_min_tokens for which the inference head rule and the
      quantiser rule pick different scales (the sampler would decode 16 sampled bits with the 64-bit BSQ).
    """
    level = _pixel_level(resolution)
    rel = _RELEASED.get(level, _RELEASED["0.40M"] if PIXEL_LEVELS[level] <= 14 else _RELEASED["0.90M"])
    n = PIXEL_LEVELS[level] if num_scales is None else _check_num_scales(num_scales)

    if height is not None or width is not None:
        if height is None or width is None:
            raise ValueError("give both height and width (or neither and an aspect)")
        if aspect is not None:
            raise ValueError("give either aspect or height/width, not both")
        if not (isinstance(height, (int, np.integer)) and isinstance(width, (int, np.integer))) \
                or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive integers, got {height!r} x {width!r}")
        h_div_w = height / width
    else:
        h_div_w = parse_aspect("16:9" if aspect is None else aspect)
    template = nearest_template(h_div_w)

    num_frames = _frames_from_duration(duration) if frames is None else frames
    pt = latent_frames(num_frames)
    if pt != 1 and (pt - 1) % 4:
        raise ValueError(f"{num_frames} frames give {pt} latent frames, which has no schedule; "
                         f"supported: {_supported_pts_text()}")
    if not training and not _sampler_can_run(pt):
        ok = "1, 17, 33, 49, 65, 81 (0-5 s), 161, 241, ... (whole 5 s clips)"
        raise ValueError(f"{num_frames} frames ({pt} latent frames) end in a partial clip after a full one, which "
                         f"the reference sampler cannot run; supported frame counts: {ok}")

    scales = scale_schedule(template, n, pt)
    d_image, d_video = (rel["image_rep"], rel["video_rep"]) if n == len(rel["image_rep"]) \
        else default_repetitions(n)
    image_rep = d_image if image_rep is None else image_rep
    video_rep = d_video if video_rep is None else video_rep
    reps = repetitions(scales, n, image_rep, video_rep)
    semantic_scales = rel["semantic_scales"] if semantic_scales is None else int(semantic_scales)
    dsmt = rel["detail_scale_min_tokens"] if detail_scale_min_tokens is None else int(detail_scale_min_tokens)
    tau_image = rel["tau_image"] if tau_image is None else float(tau_image)
    tau_video = rel["tau_video"] if tau_video is None else float(tau_video)

    sched = Schedule(
        scales=tuple(scales), scales_per_clip=n, reps=tuple(reps), template=template,
        pixel_hw=pixel_hw(template, n), num_frames=int(num_frames), semantic_scales=semantic_scales,
        detail_scale_min_tokens=dsmt, tau=tuple(tau_list(scales, n, tau_image, tau_video)),
        context=tuple(context_info(scales, n)),
    )
    if strict_heads and sched.head_mismatch():
        raise ValueError(
            f"semantic_scales={semantic_scales} and detail_scale_min_tokens={dsmt} disagree on scales "
            f"{sched.head_mismatch()} of {scales[:n]} (head: rel_si < semantic_scales is semantic; quantiser: "
            "ph*pw >= detail_scale_min_tokens is detail); pick values that agree")
    return sched
