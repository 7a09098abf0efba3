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
from infstar_jax.transformer import rope
from infstar_jax.transformer.attention import BlockLayout
from infstar_jax.transformer.config import TransformerConfig
from infstar_jax.transformer.model import Block, Transformer, fuse_qkv

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


def _step_input(cum, spec: "_StepSpec") -> jax.Array:
    """``[B, pt, ph, pw, 64]`` input features of a step: zeros at a clip's first scale, else the down-sampled sum."""
    if spec.zero_input:
        return jnp.zeros((cum.shape[0], *spec.shape, cum.shape[-1]), jnp.float32)
    return multiscale.next_input(cum, spec.shape)


def _sample_bits(detail, semantic, cum, x_in, tau, rand, step_index, force, forced_bits, k, v, spec: "_StepSpec"):
    """Head logits -> guided p(bit=1) -> bits (or the forced ones) -> accumulator; the step's output dict."""
    b = cum.shape[0]
    pt, ph, pw = spec.shape
    n_tok, d = pt * ph * pw, spec.bits
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


@functools.partial(jax.jit, static_argnames=("cfg", "spec"), donate_argnames=("cum",))
def _visual_step(params, cum, positions, prefix_k, prefix_v, prefix_valid, tau, rand, step_index, force, forced_bits, *,
                 cfg: TransformerConfig, spec: _StepSpec):
    """One AR step for B prompts as one program (the layers scanned over their stacked weights).

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
    x_in = _step_input(cum, spec)
    n_tok = int(np.prod(spec.shape))
    feats = _interleave(x_in.reshape(b, n_tok, -1))
    pos = jnp.broadcast_to(positions, (2 * b, n_tok, 4))
    (detail, semantic), (k, v) = Transformer(cfg).apply(
        {"params": params}, feats, pos, prefix_k, prefix_v, prefix_valid, method=Transformer.visual_step
    )
    return _sample_bits(detail, semantic, cum, x_in, tau, rand, step_index, force, forced_bits, k, v, spec)


# -- the same step as one program per layer (``layer_loop="layers"``) ---------------------------------------------------


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def _embed_step(params, cum, positions, *, cfg: TransformerConfig, spec: _StepSpec):
    """``(x_in, h [2B, L, C], cos, sin)`` of a visual step (non-block params only)."""
    b = cum.shape[0]
    x_in = _step_input(cum, spec)
    n_tok = int(np.prod(spec.shape))
    feats = _interleave(x_in.reshape(b, n_tok, -1))
    h = Transformer(cfg).apply({"params": params}, feats, method=Transformer.embed_visual)
    cos, sin = rope.cos_sin(jnp.broadcast_to(positions, (2 * b, n_tok, 4)), cfg.head_dim, cfg.rope_base)
    return x_in, h, cos, sin


@functools.partial(jax.jit, static_argnames=("cfg", "layout"), donate_argnames=("h",))
def _layer(layer_params, h, cos, sin, key_valid, prefix_k, prefix_v, prefix_valid, *, cfg: TransformerConfig,
           layout: BlockLayout | None):
    """One block on its own weights: ``(h', k, v)``. With ``prefix_k`` the tokens also see the cached prefix (visual
    steps); without, ``layout`` / ``key_valid`` describe the tokens (the text step)."""
    prefix = None if prefix_k is None else (prefix_k, prefix_v, prefix_valid)
    h, (k, v) = Block(cfg).apply({"params": layer_params}, h, cos, sin, layout, key_valid, prefix)
    return h, k, v


@functools.partial(jax.jit, static_argnames=("cfg", "spec"), donate_argnames=("cum",))
def _head_step(params, h, cum, x_in, tau, rand, step_index, force, forced_bits, k, v, *, cfg: TransformerConfig,
               spec: _StepSpec):
    """Heads, guidance and bit sampling of a visual step after its last block (see ``_visual_step``)."""
    detail, semantic = Transformer(cfg).apply({"params": params}, h, method=Transformer.logits)
    return _sample_bits(detail, semantic, cum, x_in, tau, rand, step_index, force, forced_bits, k, v, spec)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _text_embed(params, text, valid, *, cfg: TransformerConfig):
    """Text prefix tokens of the (cond, uncond) rows and their RoPE tables."""
    b, lt, _ = text.shape
    rows = jnp.where(valid, jnp.arange(lt)[None, :], -1)
    uncond_rows = jnp.stack([jnp.full_like(rows, -1), rows], axis=1).reshape(2 * b, lt)
    h = Transformer(cfg).apply({"params": params}, _interleave(text), uncond_rows, method=Transformer.embed_text)
    pos = jnp.broadcast_to(jnp.asarray(_text_positions(lt)), (2 * b, lt, 4))
    cos, sin = rope.cos_sin(pos, cfg.head_dim, cfg.rope_base)
    return h, cos, sin


def _kv_length(kv) -> int:
    """Cached keys of one scale: ``[layers, 2B, L, ...]`` (scan) or a per-layer list of ``[2B, L, ...]``."""
    return kv[0].shape[1] if isinstance(kv, list) else kv.shape[2]


def split_layers(params: Mapping[str, Any], *, donate: bool = False) -> dict:
    """Params with the stacked ``blocks`` replaced by ``layers``: one pytree per layer, each leaf its own buffer
    (what ``layer_loop="layers"`` runs on). ``donate`` deletes each stacked leaf once it is split, so that the
    weights exist only once at any time beyond one leaf (the caller must not use ``params`` afterwards)."""
    if "layers" in params:
        return dict(params)
    blocks = params["blocks"]
    leaves, treedef = jax.tree.flatten(blocks)
    depth = leaves[0].shape[0]
    per_leaf = []
    for leaf in leaves:
        per_leaf.append([leaf[i] for i in range(depth)])
        if donate and isinstance(leaf, jax.Array):
            leaf.delete()
    out = {k: v for k, v in params.items() if k != "blocks"}
    out["layers"] = [jax.tree.unflatten(treedef, [pl[i] for pl in per_leaf]) for i in range(depth)]
    return out


def _unsplit(layers) -> bool:
    """True when no attention weight is divided between devices (host arrays, one device, or replicated), so that
    the Q/K/V kernels can be concatenated."""
    for lp in layers:
        for leaf in jax.tree.leaves(lp["attn"]):
            sharding = getattr(leaf, "sharding", None)
            if sharding is not None and len(sharding.device_set) > 1 and not sharding.is_fully_replicated:
                return False
    return True


def default_layer_loop() -> str:
    """``"layers"`` (one program per layer on separate weight buffers) except on TPU, where the compiler reads the
    scanned weights in place and one program per step is cheaper to dispatch. On GPUs the scan copies every layer's
    weights out of the stacked arrays at each step (≈ 9 ms of an 8B model's step: a third of a 480p image)."""
    return "scan" if jax.default_backend() == "tpu" else "layers"


class Sampler:
    """Samples bits (and summed codes) for one schedule.

    Args:
      cfg: transformer config (precision included).
      params: transformer params (host or device, possibly sharded), stacked as stored, or already
        ``split_layers``-ed.
      schedule: a ``schedules.Schedule`` (from ``schedules.resolve``).
      guidance: ``GuidanceConfig``.
      layer_loop: ``"layers"`` (one program per layer, each on its own weight buffers, with its Q/K/V kernels
        concatenated where no weight is split between devices) or ``"scan"`` (one program
        per step, layers scanned over the stacked weights); ``None`` = ``default_layer_loop()``. Both compute the
        same products (their logits agree to rounding and their bits are equal: tests/test_sampling.py).
      donate_params: with ``"layers"``, split the stacked weights in place (``split_layers(donate=True)``): the
        caller's ``params`` are consumed and the weights are never held twice.
    """

    def __init__(self, cfg: TransformerConfig, params: Any, schedule: schedules.Schedule,
                 guidance: GuidanceConfig = GuidanceConfig(), *, layer_loop: str | None = None,
                 donate_params: bool = False):
        self.cfg = cfg
        self.layer_loop = layer_loop or default_layer_loop()
        if self.layer_loop not in ("layers", "scan"):
            raise ValueError(f"layer_loop={self.layer_loop!r}; expected 'layers' or 'scan'")
        if self.layer_loop == "layers":
            self.params = split_layers(params, donate=donate_params)
            if _unsplit(self.params["layers"]):  # one Q/K/V matmul per layer (model.fuse_qkv)
                self.params["layers"] = [fuse_qkv(lp, donate=donate_params) if "q_proj" in lp["attn"] else lp
                                         for lp in self.params["layers"]]
            self._head_params = {k: v for k, v in self.params.items() if k != "layers"}
        else:
            if "blocks" not in params:
                raise ValueError("layer_loop='scan' needs the stacked params (with 'blocks'), not split_layers ones")
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

    # -- the two layer loops --------------------------------------------------------------------------------------
    def _text_kv(self, text, valid):
        """K/V of the text step: stacked ``[layers, 2B, Lt, Hkv, hd]`` (scan) or per-layer lists (layers)."""
        if self.layer_loop == "scan":
            return _text_step(self.params, text, valid, cfg=self.cfg)
        h, cos, sin = _text_embed(self._head_params, text, valid, cfg=self.cfg)
        layout = BlockLayout((text.shape[1],), ((0,),))
        key_valid = _interleave(valid)
        ks, vs = [], []
        for lp in self.params["layers"]:
            h, k, v = _layer(lp, h, cos, sin, key_valid, None, None, None, cfg=self.cfg, layout=layout)
            ks.append(k)
            vs.append(v)
        return ks, vs

    def _prefix(self, parts_k, parts_v):
        """Concatenation of the cached K/V parts along the key axis (per layer in the ``layers`` loop)."""
        if self.layer_loop == "scan":
            return jnp.concatenate(parts_k, axis=2), jnp.concatenate(parts_v, axis=2)
        return ([jnp.concatenate(ks, axis=1) for ks in zip(*parts_k)],
                [jnp.concatenate(vs, axis=1) for vs in zip(*parts_v)])

    def _visual(self, spec, cum, positions, prefix_k, prefix_v, prefix_valid, tau, rand, index, force, forced_bits):
        if self.layer_loop == "scan":
            return _visual_step(self.params, cum, positions, prefix_k, prefix_v, prefix_valid, tau, rand, index, force,
                                forced_bits, cfg=self.cfg, spec=spec)
        x_in, h, cos, sin = _embed_step(self._head_params, cum, positions, cfg=self.cfg, spec=spec)
        ks, vs = [], []
        for lp, pk, pv in zip(self.params["layers"], prefix_k, prefix_v):
            h, k, v = _layer(lp, h, cos, sin, None, pk, pv, prefix_valid, cfg=self.cfg, layout=None)
            if spec.write_kv:
                ks.append(k)
                vs.append(v)
        return _head_step(self._head_params, h, cum, x_in, tau, rand, index, force, forced_bits,
                          ks or None, vs or None, cfg=self.cfg, spec=spec)

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
        if lt > self.cfg.text_maxlen:
            # The learned unconditional rows and the attention's text mask cover text_maxlen rows (the prefix's
            # padding may only sit in its last text_maxlen keys).
            raise ValueError(f"text has {lt} rows; the model takes at most text_maxlen={self.cfg.text_maxlen}")
        lengths = jnp.asarray(text_lengths, jnp.int32)
        valid = jnp.arange(lt)[None, :] < lengths[:, None]
        text_k, text_v = self._text_kv(text, valid)
        text_valid = _interleave(valid)
        ref_cache: dict[int, tuple[Any, Any]] = {}
        prefixes: dict[tuple[int, ...], tuple[Any, Any, jax.Array]] = {}
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
            refs = tuple(step.ref_sids)
            if refs not in prefixes:  # the same prefix serves every step of a clip: concatenate it once
                pk, pv = self._prefix([ref_cache[r][0] for r in refs] + [text_k],
                                      [ref_cache[r][1] for r in refs] + [text_v])
                ref_len = sum(_kv_length(ref_cache[r][0]) for r in refs)
                pvalid = jnp.concatenate([jnp.ones((2 * b, ref_len), bool), text_valid], axis=1)
                prefixes[refs] = (pk, pv, pvalid)
            prefix_k, prefix_v, prefix_valid = prefixes[refs]
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
            out = self._visual(
                spec, cum, jnp.asarray(self.schedule.rope_positions(step.si, step.rep)), prefix_k, prefix_v,
                prefix_valid, jnp.float32(step.tau), rand, jnp.int32(step.index), jnp.bool_(step.index in forced),
                forced[step.index] if step.index in forced else jnp.zeros((b, *step.shape, step.bits), jnp.uint8),
            )
            cum = out["cum"]
            bits_out.append(out["bits"])
            if spec.write_kv:
                ref_cache[step.si] = (out["k"], out["v"])
            if record:
                records.append(out["record"])
            # Free cache entries and prefixes no later step reads.
            later = [tuple(s.ref_sids) for s in self.steps[step.index + 1:]]
            later_refs = {r for t in later for r in t}
            for r in list(ref_cache):
                if r not in later_refs:
                    del ref_cache[r]
            for t in list(prefixes):
                if t not in later:
                    del prefixes[t]
        clip_codes.append(cum)
        return SampleResult(bits_out, jnp.concatenate(clip_codes, axis=1), records)
