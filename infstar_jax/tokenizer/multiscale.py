"""Multi-scale residual BSQ over a clip schedule, with bitwise self-correction (SPEC §4.7, §5, §6.4 steps 8-10).

The reference's `video_encode_global_bsc` / `video_decode` (`infinity/schedules/infinity_elegant.py`). A latent
video [B, T, H, W, 64] is cut into clips (clip 0 = the first latent frame as an image, clip k >= 1 = up to 20 latent
frames). Each clip keeps an accumulator `cum` [B, Tc, H, W, 64] that starts at zero; every step (scale si,
repetition r) of the clip
  1. gives the transformer its input `x_in = down3(cum, (pt, ph, pw))`,
  2. quantises the residual `interp_chw(target - cum, (d, ph, pw), 'area')` with BSQ (d = 16 on semantic scales,
     64 on detail ones) -> the clean bits are the step's label,
  3. (self-correction, every scale but the schedule's last) flips some bits, requantises them,
  4. adds `interp_chw(codes, (64, H, W), 'trilinear')` to `cum`.
The clips' final accumulators, concatenated on time, are the summed codes the VAE decodes.

Everything is static-shape and traced with Python loops over the (static) plan, so `encode` jits as one program.
The sampler uses the same pieces one step at a time: `init_accumulator`, `next_input`, `accumulate`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from infstar_jax.tokenizer.bsq import bits_to_codes, bsq_quantize
from infstar_jax.tokenizer.resample import down3, interp_chw

Shape3 = tuple[int, int, int]


class Step(NamedTuple):
    """One AR step: `index` = cumulative (scale, repetition) index (= the reference's real_si / gt_ls_Bl index)."""

    index: int
    si: int
    rep: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static description of a sample's multi-scale quantisation (hashable: usable as a jit static argument).

    Per scale si: `scales[si]` = (pt, ph, pw); `reps[si]` repetitions; `frames[si]` = [frame_ss, frame_ee) of its
    clip in the latent; `clips[si]` clip index; `detail[si]` (64-bit detail head iff ph*pw >= detail_scale_min_tokens,
    else 16-bit semantic); `bits[si]` = d; `self_correct[si]` whether its steps get bitwise self-correction
    (si < len(scales) - 1 in the reference, i.e. every scale except the schedule's last).
    """

    scales: tuple[Shape3, ...]
    reps: tuple[int, ...]
    frames: tuple[tuple[int, int], ...]
    clips: tuple[int, ...]
    detail: tuple[bool, ...]
    bits: tuple[int, ...]
    self_correct: tuple[bool, ...]
    latent_dim: int = 64

    def __post_init__(self):
        n = len(self.scales)
        if n == 0:
            raise ValueError("Plan: the schedule has no scales")
        for name in ("reps", "frames", "clips", "detail", "bits", "self_correct"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Plan: {name} has {len(getattr(self, name))} entries, expected one per scale ({n})")
        if any(r < 1 for r in self.reps):
            raise ValueError(f"Plan: repetitions must be >= 1, got {self.reps}")
        if list(self.clips) != sorted(self.clips) or self.clips[0] != 0 or len(set(self.clips)) != self.clips[-1] + 1:
            raise ValueError(f"Plan: clip indices must run 0, 1, ... in scale order, got {self.clips}")
        full_hw = self.scales[-1][1:]
        for c in range(self.num_clips):
            sis = self.clip_scales(c)
            fs, fe = self.frames[sis[0]]
            for si in sis:
                pt, ph, pw = self.scales[si]
                if self.frames[si] != (fs, fe):
                    raise ValueError(f"Plan: scale {si} has frames {self.frames[si]}, its clip {c} has {(fs, fe)}")
                if pt != fe - fs:
                    raise ValueError(
                        f"Plan: scale {si} {self.scales[si]} has pt={pt} but its clip {c} spans {fe - fs} latent "
                        f"frames [{fs}, {fe}); every scale of a clip must span the whole clip"
                    )
            if self.scales[sis[-1]][1:] != full_hw:
                raise ValueError(
                    f"Plan: clip {c} ends at {self.scales[sis[-1]]}, not at the full spatial size {full_hw}"
                )

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_schedule(
        cls,
        scales: Sequence[Sequence[int]],
        reps: Sequence[int],
        scales_per_clip: int,
        detail_scale_min_tokens: int,
        frames_inner_clip: int = 20,
        *,
        semantic_dim: int = 16,
        detail_dim: int = 64,
        latent_dim: int = 64,
        noise_apply_layers: int = 1000,
    ) -> "Plan":
        """Plan of a schedule as the reference builds it (`get_scale_pack_info`, `video_encode_global_bsc`).

        scales: [(pt, ph, pw)] of the sample's whole schedule; reps: repetitions per scale (len(scales) entries, e.g.
        `schedules.repetitions(...)`); scales_per_clip: N. Clip of si = si // N. Frames: clip 0 = [0, pt of its last
        scale); clip k >= 1 starts at pt(scale 0) + (k-1)*frames_inner_clip and spans the pt of its own last scale.
        This must agree with `schedules.context_info` (tests/test_multiscale.py asserts it).
        """
        scales = tuple(tuple(int(v) for v in s) for s in scales)
        if any(len(s) != 3 for s in scales):
            raise ValueError(f"Plan.from_schedule: every scale must be (pt, ph, pw), got {scales}")
        n = int(scales_per_clip)
        if n < 1 or len(scales) % n:
            raise ValueError(
                f"Plan.from_schedule: {len(scales)} scales are not a whole number of clips of {scales_per_clip} scales"
            )
        reps = tuple(int(r) for r in reps)
        if len(reps) != len(scales):
            raise ValueError(
                f"Plan.from_schedule: reps has {len(reps)} entries, expected one per scale ({len(scales)})"
            )
        frames, clips = [], []
        for si in range(len(scales)):
            clip = si // n
            last_pt = scales[n * (clip + 1) - 1][0]
            start = 0 if clip == 0 else scales[0][0] + (clip - 1) * int(frames_inner_clip)
            frames.append((start, start + last_pt))
            clips.append(clip)
        detail = tuple(ph * pw >= int(detail_scale_min_tokens) for _, ph, pw in scales)
        last_noised = min(len(scales) - 1, int(noise_apply_layers))
        return cls(
            scales=scales,
            reps=reps,
            frames=tuple(frames),
            clips=tuple(clips),
            detail=detail,
            bits=tuple(int(detail_dim) if d else int(semantic_dim) for d in detail),
            self_correct=tuple(si < last_noised for si in range(len(scales))),
            latent_dim=int(latent_dim),
        )

    # ---- derived tables -----------------------------------------------------------------------------------
    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @property
    def num_clips(self) -> int:
        return self.clips[-1] + 1

    @property
    def full_hw(self) -> tuple[int, int]:
        """(H, W) of the latent = the schedule's last scale."""
        return self.scales[-1][1], self.scales[-1][2]

    @property
    def latent_frames(self) -> int:
        """T of the latent the plan covers (end of the last clip)."""
        return self.frames[-1][1]

    @property
    def steps(self) -> tuple[Step, ...]:
        out = []
        for si, r in enumerate(self.reps):
            for rep in range(r):
                out.append(Step(len(out), si, rep))
        return tuple(out)

    @property
    def num_steps(self) -> int:
        return sum(self.reps)

    def step_index(self, si: int, rep: int) -> int:
        if not (0 <= si < self.num_scales and 0 <= rep < self.reps[si]):
            raise ValueError(f"no step (si={si}, rep={rep}) in a plan with reps {self.reps}")
        return sum(self.reps[:si]) + rep

    def clip_scales(self, clip: int) -> tuple[int, ...]:
        return tuple(si for si, c in enumerate(self.clips) if c == clip)

    def clip_frames(self, clip: int) -> tuple[int, int]:
        return self.frames[self.clip_scales(clip)[0]]

    def bits_shape(self, si: int, batch: int) -> tuple[int, ...]:
        """Shape of the bits of scale si: [B, pt, ph, pw, d]."""
        return (batch, *self.scales[si], self.bits[si])


# ---- the per-step pieces (shared by encode, codes_from_bits and the sampler) -----------------------------------


def init_accumulator(plan: Plan, clip: int, batch: int) -> jax.Array:
    """A clip's zero accumulator [B, Tc, H, W, latent_dim] fp32 (the reference's zeros up-sampled: still zeros)."""
    fs, fe = plan.clip_frames(clip)
    return jnp.zeros((batch, fe - fs, *plan.full_hw, plan.latent_dim), jnp.float32)


def next_input(cum: jax.Array, scale: Sequence[int]) -> jax.Array:
    """Transformer input of a step: cum [B, Tc, H, W, C] -> down3 to scale (pt, ph, pw) -> [B, pt, ph, pw, C]."""
    return down3(cum, tuple(scale))


def upsample_codes(codes: jax.Array, cum_shape: Sequence[int]) -> jax.Array:
    """codes [B, pt, ph, pw, d] -> [B, pt, H, W, C] by trilinear over (channel, H, W) jointly (d=16 -> 64 too)."""
    _, _, h, w, c = cum_shape
    return interp_chw(codes, (c, h, w), "trilinear")


def accumulate(cum: jax.Array, bits: jax.Array) -> jax.Array:
    """cum [B, Tc, H, W, C] + up-sampled codes of bits [B, pt=Tc, ph, pw, d] (0/1) -> new cum (SPEC §6.4 steps 8-9)."""
    if bits.ndim != 5 or bits.shape[:2] != cum.shape[:2]:
        raise ValueError(f"accumulate: bits {bits.shape} must be [B, Tc, ph, pw, d] for an accumulator {cum.shape}")
    return cum + upsample_codes(bits_to_codes(bits), cum.shape)


# ---- encoding -----------------------------------------------------------------------------------------------


class EncodeResult(NamedTuple):
    """Per-step tuples are indexed by `Plan.steps` order (the cumulative step index).

    x_in[k]      [B, pt, ph, pw, C] fp32  transformer input of step k (down3 of the accumulator before the step)
    bits[k]      [B, pt, ph, pw, d] uint8 clean BSQ bits of target - cum: the GT label of step k
    used_bits[k] [B, pt, ph, pw, d] uint8 bits after self-correction flips (what was accumulated)
    codes[k]     [B, pt, ph, pw, d] fp32  codes accumulated at step k (requantised used_bits; the raw BSQ output on
                                          scales without self-correction, as the reference)
    clip_codes[c] [B, Tc, H, W, C] fp32   final accumulator of clip c
    summed_codes [B, T, H, W, C] fp32     clip accumulators concatenated on time (what the VAE decodes)
    intermediates: None, or a dict of per-step tuples: cum_before [B,Tc,H,W,C], residual [B,Tc,H,W,C],
                   residual_down [B,pt,ph,pw,d], q_raw [B,pt,ph,pw,d] (BSQ output), up [B,Tc,H,W,C]
    """

    x_in: tuple
    bits: tuple
    used_bits: tuple
    codes: tuple
    clip_codes: tuple
    summed_codes: jax.Array
    intermediates: Optional[dict]


# mask_fn(si, bits_shape) -> bool [reps(si), *bits_shape] (the flip masks of the scale's repetitions) or None.
MaskFn = Callable[[int, tuple], Optional[jax.Array]]
_INTERMEDIATES = ("cum_before", "residual", "residual_down", "q_raw", "up")


def _check_latent(latent: jax.Array, plan: Plan) -> None:
    want = (plan.latent_frames, *plan.full_hw, plan.latent_dim)
    if latent.ndim != 5 or tuple(latent.shape[1:]) != want:
        raise ValueError(
            f"encode: latent must be [B, T, H, W, C] = [B, {', '.join(map(str, want))}] for this plan "
            f"(schedule ending at {plan.scales[-1]}), got {tuple(latent.shape)}"
        )


def _quantize_step(target, cum, scale, d, self_correct, mask, return_intermediates):
    """One (scale, repetition) step on a clip: returns (cum after the step, the step's outputs)."""
    _, ph, pw = scale
    x_in = next_input(cum, scale)
    residual = target - cum
    residual_down = interp_chw(residual, (d, ph, pw), "area")
    q_raw, bits = bsq_quantize(residual_down)
    if self_correct:
        used = bits if mask is None else jnp.where(mask, 1 - bits, bits).astype(jnp.uint8)
        codes = bits_to_codes(used)
    else:  # the reference does not requantise the schedule's last scale: it accumulates the BSQ output itself
        used, codes = bits, q_raw
    up = upsample_codes(codes, cum.shape)
    out = {"x_in": x_in, "bits": bits, "used_bits": used, "codes": codes}
    if return_intermediates:
        out.update(cum_before=cum, residual=residual, residual_down=residual_down, q_raw=q_raw, up=up)
    return cum + up, out


def _encode(latent: jax.Array, plan: Plan, mask_fn: MaskFn, return_intermediates: bool) -> EncodeResult:
    """The one implementation; `mask_fn` gives the flip masks of a self-corrected scale's repetitions.

    The repetitions of a scale share every shape, so they run as one `lax.scan`: the traced program grows with the
    number of scales, not of steps.
    """
    _check_latent(latent, plan)
    latent = latent.astype(jnp.float32)
    batch = latent.shape[0]
    outs, clip_codes = [], []
    for clip in range(plan.num_clips):
        fs, fe = plan.clip_frames(clip)
        target = latent[:, fs:fe]
        cum = init_accumulator(plan, clip, batch)
        for si in plan.clip_scales(clip):
            sc = plan.self_correct[si]
            masks = mask_fn(si, plan.bits_shape(si, batch)) if sc else None

            def step(c, m, si=si, sc=sc):
                return _quantize_step(target, c, plan.scales[si], plan.bits[si], sc, m, return_intermediates)

            if plan.reps[si] == 1:
                cum, out = step(cum, None if masks is None else masks[0])
                outs.append(out)
            else:
                cum, stacked = jax.lax.scan(step, cum, masks, length=plan.reps[si])
                outs.extend(jax.tree.map(lambda v, r=r: v[r], stacked) for r in range(plan.reps[si]))
        clip_codes.append(cum)
    return EncodeResult(
        x_in=tuple(o["x_in"] for o in outs),
        bits=tuple(o["bits"] for o in outs),
        used_bits=tuple(o["used_bits"] for o in outs),
        codes=tuple(o["codes"] for o in outs),
        clip_codes=tuple(clip_codes),
        summed_codes=jnp.concatenate(clip_codes, axis=1),
        intermediates={k: tuple(o[k] for o in outs) for k in _INTERMEDIATES} if return_intermediates else None,
    )


def encode(
    latent: jax.Array,
    plan: Plan,
    flip_masks: Optional[Sequence[Optional[jax.Array]]] = None,
    *,
    return_intermediates: bool = False,
) -> EncodeResult:
    """Multi-scale residual quantisation of latent [B, T, H, W, C] along `plan` (jit with `plan` static).

    flip_masks: None (no self-correction flips: the inference / gt-leak tokenisation) or one entry per step (Plan.steps
    order), each None or a bool/0-1 array [B, pt, ph, pw, d] of bits to flip on that step (only scales with
    `plan.self_correct`). Flipped bits are requantised and accumulated; labels stay the clean bits (SPEC §5).
    """
    if flip_masks is not None:
        if len(flip_masks) != plan.num_steps:
            raise ValueError(
                f"encode: flip_masks has {len(flip_masks)} entries, expected one per step ({plan.num_steps})"
            )
        for step in plan.steps:
            if flip_masks[step.index] is not None and not plan.self_correct[step.si]:
                raise ValueError(
                    f"encode: step {step.index} (scale {step.si}) is on the schedule's last scale, which the "
                    "reference never self-corrects; give it no flip mask"
                )

    def mask_fn(si: int, shape: tuple) -> Optional[jax.Array]:
        if flip_masks is None:
            return None
        ks = [plan.step_index(si, r) for r in range(plan.reps[si])]
        if all(flip_masks[k] is None for k in ks):
            return None
        per_rep = []
        for k in ks:
            m = jnp.zeros(shape, bool) if flip_masks[k] is None else jnp.asarray(flip_masks[k])
            if tuple(m.shape) != tuple(shape):
                raise ValueError(f"encode: flip mask of step {k} has shape {m.shape}, expected {shape}")
            per_rep.append(m.astype(bool))
        return jnp.stack(per_rep)

    return _encode(latent, plan, mask_fn, return_intermediates)


def encode_self_correct(
    latent: jax.Array,
    plan: Plan,
    key: jax.Array,
    flip_probs: jax.Array,
    *,
    return_intermediates: bool = False,
) -> EncodeResult:
    """`encode` with self-correction flips drawn from `key`: each bit of step k flips with probability flip_probs[k].

    flip_probs: [num_steps] float (traced; e.g. `sample_flip_probs`); entries of steps on scales without
    self-correction are ignored. One uniform draw covers all steps' bits (one RNG kernel to compile, not one per
    step); the steps take consecutive slices of it in step order.
    """
    flip_probs = jnp.asarray(flip_probs, jnp.float32)
    if flip_probs.shape != (plan.num_steps,):
        raise ValueError(f"encode_self_correct: flip_probs must have shape ({plan.num_steps},), got {flip_probs.shape}")
    batch = latent.shape[0]
    offsets, total = {}, 0
    for si in range(plan.num_scales):
        if plan.self_correct[si]:
            offsets[si] = total
            total += plan.reps[si] * int(np.prod(plan.bits_shape(si, batch)))
    uniforms = jax.random.uniform(key, (total,), jnp.float32)

    def mask_fn(si: int, shape: tuple) -> jax.Array:
        reps, k0 = plan.reps[si], plan.step_index(si, 0)
        u = jax.lax.slice(uniforms, (offsets[si],), (offsets[si] + reps * int(np.prod(shape)),))
        p = jax.lax.slice(flip_probs, (k0,), (k0 + reps,)).reshape((reps,) + (1,) * len(shape))
        return u.reshape((reps, *shape)) < p

    return _encode(latent, plan, mask_fn, return_intermediates)


def sample_flip_probs(key: jax.Array, plan: Plan, strength) -> jax.Array:
    """Per-step flip probabilities as the reference draws them (`apply_noise_requant`): p = randint(0, 100·s + 1)/100.

    strength: a float (every scale) or a per-scale sequence (indexed by si, at least num_scales entries); s = 0.3
    gives p uniform on {0.00, 0.01, ..., 0.30}, s < 0 gives p = 0. The bound is truncated to an integer as numpy
    does with the reference's float bound (s = 0.29 gives at most 0.28). Steps without self-correction get 0.
    Returns [num_steps] fp32.
    """
    if np.ndim(strength) == 0:
        per_scale = [float(strength)] * plan.num_scales
    else:
        per_scale = [float(s) for s in strength]
        if len(per_scale) < plan.num_scales:
            raise ValueError(f"sample_flip_probs: strength has {len(per_scale)} entries, need {plan.num_scales}")
    highs = np.array([max(1, int(100 * per_scale[s.si] + 1)) for s in plan.steps], np.int32)
    draws = jax.random.randint(key, (plan.num_steps,), 0, jnp.asarray(highs))
    on = jnp.asarray([plan.self_correct[s.si] for s in plan.steps])
    return jnp.where(on, draws.astype(jnp.float32) * 0.01, 0.0)


# ---- decoding side -------------------------------------------------------------------------------------------


def codes_from_bits(bits_per_step: Sequence[jax.Array], plan: Plan) -> jax.Array:
    """The reference's `video_decode` up to the VAE: per-step bits (Plan.steps order, each [B, pt, ph, pw, d]) ->
    summed codes [B, T_lat, H, W, C] fp32 (each clip accumulated from zero, clips concatenated on time)."""
    if len(bits_per_step) != plan.num_steps:
        raise ValueError(f"codes_from_bits: got {len(bits_per_step)} bit tensors, the plan has {plan.num_steps} steps")
    batch = bits_per_step[0].shape[0]
    clip_codes = []
    for clip in range(plan.num_clips):
        cum = init_accumulator(plan, clip, batch)
        for step in plan.steps:
            if plan.clips[step.si] != clip:
                continue
            bits = bits_per_step[step.index]
            want = plan.bits_shape(step.si, batch)
            if tuple(bits.shape) != want:
                raise ValueError(f"codes_from_bits: bits of step {step.index} have shape {bits.shape}, expected {want}")
            cum = accumulate(cum, bits)
        clip_codes.append(cum)
    return jnp.concatenate(clip_codes, axis=1)
