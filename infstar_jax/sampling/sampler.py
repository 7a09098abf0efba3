"""The autoregressive next-scale sampler (SPEC §6.4-6.6), jitted per step shape, batched over prompts.

For a batch of B prompts the transformer runs on 2B rows in prompt-major order ``[cond_0, uncond_0, cond_1, ...]``
(the unconditional branch uses the learned ``cfg_uncond[:len]``), so a data-parallel split of the batch keeps each
prompt's two branches together and a prompt's output does not depend on what else is in the batch.

State between steps is explicit: the text K/V, the K/V of the scales later steps reference (the last repetition of
each clip's last scale), the running accumulator of the current clip, and the finished clips' accumulators. Each step
is one jitted function, compiled once per distinct (step shape, head, referenced length) and reused for every
repetition, every clip with the same shapes and every batch of the same size.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from infstar_jax import schedules
from infstar_jax.sampling import guidance as guidance_lib
from infstar_jax.tokenizer import multiscale
from infstar_jax.transformer.config import TransformerConfig
from infstar_jax.transformer.model import Transformer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GuidanceConfig:
    """``kind``: 'apg' (released), 'cfg' or 'none'; ``scale`` 1 disables guidance (the reference's ``cfg == 1``)."""

    kind: str = "apg"
    scale: float = 34.0
    norm_threshold: float = 0.05
    eta: float = 0.0

    def __post_init__(self):
        if self.kind not in ("apg", "cfg", "none"):
            raise ValueError(f"guidance kind {self.kind!r}; expected 'apg', 'cfg' or 'none'")

    @property
    def active(self) -> bool:
        return self.kind != "none" and self.scale != 1


@dataclasses.dataclass(frozen=True)
class _StepSpec:
    """Static part of one step's compiled function."""

    shape: tuple[int, int, int]
    bits: int
    head_detail: bool
    zero_input: bool
    write_kv: bool
    guidance: GuidanceConfig
    given_uniforms: bool
    record: bool


@dataclasses.dataclass
class SampleResult:
    """``bits[k]``: ``[B, pt, ph, pw, d]`` uint8 bits of step k (after any forcing); ``summed_codes``:
    ``[B, T, H, W, 64]`` fp32 (the VAE decoder input); ``records[k]`` (when asked): x_in, logits_raw
    ``[B, 2, L, 2d]`` (cond, uncond), logits_guided ``[B, L, 2d]``, p1 ``[B, pt, ph, pw, d]``."""

    bits: list
    summed_codes: jax.Array
    records: list | None = None


def _text_positions(length: int) -> np.ndarray:
    return schedules.text_rope_positions(length)


def _interleave(x: jax.Array) -> jax.Array:
    """[B, ...] -> [2B, ...] prompt-major (cond, uncond) rows."""
    return jnp.repeat(x, 2, axis=0)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _text_step(params, text, valid, *, cfg: TransformerConfig):
    """text [B, Lt, D], valid [B, Lt] -> K/V [layers, 2B, Lt, Hkv, hd] for (cond, uncond) rows."""
    b, lt, _ = text.shape
    rows = jnp.where(valid, jnp.arange(lt)[None, :], -1)
    uncond_rows = jnp.stack([jnp.full_like(rows, -1), rows], axis=1).reshape(2 * b, lt)
    pos = jnp.broadcast_to(jnp.asarray(_text_positions(lt)), (2 * b, lt, 4))
    return Transformer(cfg).apply(
        {"params": params}, _interleave(text), pos, _interleave(valid), uncond_rows, method=Transformer.text_step
    )


@functools.partial(jax.jit, static_argnames=("cfg", "spec"), donate_argnames=("cum",))
def _visual_step(params, cum, positions, prefix_k, prefix_v, prefix_valid, tau, rand, step_index, force, forced_bits, *,
                 cfg: TransformerConfig, spec: _StepSpec):
    """One AR step for B prompts.

    Args:
      cum: ``[B, Tc, H, W, 64]`` accumulator of the current clip (before this step).
      positions: ``[L, 4]`` RoPE positions of this step.
      prefix_k/v: ``[layers, 2B, Lp, Hkv, hd]`` cached K/V (referenced scales, then text); prefix_valid ``[2B, Lp]``.
      tau: fp32 scalar temperature.
      rand: ``[B, L*d]`` uniforms (``spec.given_uniforms``) or ``[B]`` PRNG keys (folded with ``step_index``).
      force, forced_bits: bool scalar and ``[B, pt, ph, pw, d]`` bits that replace the sampled ones when ``force``
        (a traced flag, so forced and free steps share one compiled function).
    Returns: dict with ``bits``, ``cum`` and, per spec, ``k``/``v`` (to cache) and recorded tensors.
    """
    b = cum.shape[0]
    pt, ph, pw = spec.shape
    n_tok, d = pt * ph * pw, spec.bits
    if spec.zero_input:
        x_in = jnp.zeros((b, pt, ph, pw, cum.shape[-1]), jnp.float32)
    else:
        x_in = multiscale.next_input(cum, spec.shape)
    feats = _interleave(x_in.reshape(b, n_tok, -1))
    pos = jnp.broadcast_to(positions, (2 * b, n_tok, 4))
    (detail, semantic), (k, v) = Transformer(cfg).apply(
        {"params": params}, feats, pos, prefix_k, prefix_v, prefix_valid, method=Transformer.visual_step
    )
    logits = (detail if spec.head_detail else semantic).reshape(b, 2, n_tok, -1)
    scaled = logits * (jnp.float32(1.0) / tau)
    g = spec.guidance
    if g.active:
        guided = guidance_lib.guide(scaled[:, 0], scaled[:, 1], kind=g.kind, scale=g.scale,
                                    norm_threshold=g.norm_threshold, eta=g.eta)
    else:
        guided = scaled[:, 0]
    p1 = jax.nn.softmax(guided.reshape(b, n_tok * d, 2), axis=-1)[..., 1]
    if spec.given_uniforms:
        u = rand
    else:
        u = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, step_index), (n_tok * d,)))(rand)
    bits = (u < p1).astype(jnp.uint8).reshape(b, pt, ph, pw, d)
    bits = jnp.where(force, forced_bits.astype(jnp.uint8), bits)
    out = {"bits": bits, "cum": multiscale.accumulate(cum, bits)}
    if spec.write_kv:
        out["k"], out["v"] = k, v
    if spec.record:
        out["record"] = dict(x_in=x_in, logits_raw=logits, logits_guided=guided, p1=p1.reshape(b, pt, ph, pw, d))
    return out


class Sampler:
    """Samples bits (and summed codes) for one schedule.

    Args:
      cfg: transformer config (precision included).
      params: transformer params (host or device, possibly sharded).
      schedule: a ``schedules.Schedule`` (from ``schedules.resolve``).
      guidance: ``GuidanceConfig``.
    """

    def __init__(self, cfg: TransformerConfig, params: Any, schedule: schedules.Schedule,
                 guidance: GuidanceConfig = GuidanceConfig()):
        self.cfg = cfg
        self.params = params
        self.schedule = schedule
        self.guidance = guidance
        self.steps = schedule.steps()
        self.plan = multiscale.Plan.from_schedule(schedule.scales, schedule.reps, schedule.scales_per_clip,
                                                  schedule.detail_scale_min_tokens)
        mismatch = schedule.head_mismatch()
        if mismatch:
            raise ValueError(
                f"the inference head rule (rel_si >= semantic_scales={schedule.semantic_scales}) and the quantiser "
                f"rule (ph*pw >= {schedule.detail_scale_min_tokens}) disagree at relative scales {mismatch}"
            )
        referenced = {r for s in self.steps for r in s.ref_sids}
        self._cache_steps = {s.index: s.si for s in self.steps if s.last_rep and s.si in referenced}

    def run(
        self,
        text: jax.Array,
        text_lengths: Sequence[int] | jax.Array,
        *,
        keys: jax.Array | None = None,
        uniforms: Sequence[jax.Array] | None = None,
        forced: Mapping[int, jax.Array] | None = None,
        record: bool = False,
        progress: bool = False,
    ) -> SampleResult:
        """Runs the text step and every visual step.

        Args:
          text: ``[B, Lt, D]`` T5 features, each prompt's valid rows first (rows past its length are ignored).
          text_lengths: ``[B]`` valid rows per prompt (EOS included).
          keys: ``[B]`` PRNG keys (one per prompt: the same key gives the same sample whatever the batch).
          uniforms: per step ``[B, L*d]`` recorded uniforms in (t, h, w, d) order (deterministic mode); else ``keys``.
          forced: step index -> ``[B, pt, ph, pw, d]`` bits replacing the sampled ones (ground-truth leak, teacher
            forcing). The forced step still runs (it fills the caches and its logits are recorded).
        """
        if (keys is None) == (uniforms is None):
            raise ValueError("pass exactly one of `keys` (sampling) or `uniforms` (deterministic mode)")
        forced = dict(forced or {})
        unknown = sorted(set(forced) - {s.index for s in self.steps})
        if unknown:
            raise ValueError(f"forced bits for unknown steps {unknown}; the schedule has {len(self.steps)} steps")
        text = jnp.asarray(text, jnp.float32)
        b, lt, _ = text.shape
        lengths = jnp.asarray(text_lengths, jnp.int32)
        valid = jnp.arange(lt)[None, :] < lengths[:, None]
        text_k, text_v = _text_step(self.params, text, valid, cfg=self.cfg)
        text_valid = _interleave(valid)
        ref_cache: dict[int, tuple[jax.Array, jax.Array]] = {}
        clip_codes, cum = [], None
        bits_out, records = [], [] if record else None
        it = self.steps
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc="AR steps", unit="step")
        for step in it:
            if step.zero_input:
                if cum is not None:
                    clip_codes.append(cum)
                cum = multiscale.init_accumulator(self.plan, step.clip, b)
            prefix_k = [ref_cache[r][0] for r in step.ref_sids] + [text_k]
            prefix_v = [ref_cache[r][1] for r in step.ref_sids] + [text_v]
            prefix_valid = [jnp.ones((2 * b, ref_cache[r][0].shape[2]), bool) for r in step.ref_sids] + [text_valid]
            spec = _StepSpec(
                shape=step.shape,
                bits=step.bits,
                head_detail=step.head_detail,
                zero_input=step.zero_input,
                write_kv=step.index in self._cache_steps,
                guidance=self.guidance,
                given_uniforms=uniforms is not None,
                record=record,
            )
            rand = jnp.asarray(uniforms[step.index]) if uniforms is not None else keys
            out = _visual_step(
                self.params, cum, jnp.asarray(self.schedule.rope_positions(step.si, step.rep)),
                jnp.concatenate(prefix_k, axis=2), jnp.concatenate(prefix_v, axis=2),
                jnp.concatenate(prefix_valid, axis=1), jnp.float32(step.tau), rand, jnp.int32(step.index),
                jnp.bool_(step.index in forced),
                forced[step.index] if step.index in forced else jnp.zeros((b, *step.shape, step.bits), jnp.uint8),
                cfg=self.cfg, spec=spec,
            )
            cum = out["cum"]
            bits_out.append(out["bits"])
            if spec.write_kv:
                ref_cache[step.si] = (out["k"], out["v"])
            if record:
                records.append(out["record"])
            # Free cache entries no later step reads.
            later = {r for s in self.steps[step.index + 1:] for r in s.ref_sids}
            for r in list(ref_cache):
                if r not in later:
                    del ref_cache[r]
        clip_codes.append(cum)
        return SampleResult(bits_out, jnp.concatenate(clip_codes, axis=1), records)
