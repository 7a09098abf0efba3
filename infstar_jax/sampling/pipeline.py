"""End-to-end generation: prompts (+ image / video) -> frames, with converted checkpoints (SPEC §6).

    gen = Generator.load("ckpt/", resolution="480p", aspect="16:9", duration=5)
    frames = gen.generate(["a corgi surfing"], seeds=[41])            # [B, 81, 480, 848, 3] uint8 RGB
    frames = gen.generate(["..."], seeds=[0], images=[rgb_uint8])     # image -> video (gt-leak of the image scales)

A checkpoint folder holds the converted parts ``transformer/``, ``vae/`` and ``text_encoder/`` (each written by
``python -m infstar_jax.convert``). Text features can also be given directly (``generate_from_features``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from infstar_jax import checkpoint, schedules
from infstar_jax.sampling.sampler import GuidanceConfig, SampleResult, Sampler, default_layer_loop
from infstar_jax.tokenizer import multiscale
from infstar_jax.tokenizer.vae import ChunkedVAE, load_vae
from infstar_jax.transformer.config import TransformerConfig

log = logging.getLogger(__name__)

PARTS = {"transformer": "transformer", "vae": "vae", "text_encoder": "t5"}


def find_parts(ckpt: str | Path) -> dict[str, Path]:
    """The converted parts inside ``ckpt``; a clear error naming what is missing."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint folder {ckpt} does not exist")
    out, missing = {}, []
    for part, kind in PARTS.items():
        d = ckpt / part
        try:
            meta = checkpoint.read_meta(d)
        except FileNotFoundError:
            missing.append(part)
            continue
        if meta.get("kind") != kind:
            raise ValueError(f"{d} holds a {meta.get('kind')!r} checkpoint, expected {kind!r}")
        out[part] = d
    if "transformer" in missing or "vae" in missing:
        raise FileNotFoundError(
            f"{ckpt} lacks {', '.join(p + '/' for p in missing)}; expected converted parts transformer/, vae/ and "
            "text_encoder/ (python -m infstar_jax.convert {transformer,vae,t5} --src ... --out CKPT/<part>)"
        )
    return out


def condition_pixels(frames_rgb: np.ndarray, pixel_hw: tuple[int, int]) -> np.ndarray:
    """uint8 RGB ``[T, H, W, 3]`` (or one image ``[H, W, 3]``) -> ``[1, T, h, w, 3]`` fp32 in [-1, 1] at the
    schedule's pixel size: resize to cover (LANCZOS) and centre-crop, as the reference's ``transform``."""
    from infstar_jax.data.video import resize_crop, to_signed_unit

    frames_rgb = np.asarray(frames_rgb)
    if frames_rgb.ndim == 3:
        frames_rgb = frames_rgb[None]
    if frames_rgb.ndim != 4 or frames_rgb.shape[-1] != 3 or frames_rgb.dtype != np.uint8:
        raise ValueError(f"conditioning frames must be uint8 RGB [T, H, W, 3] or [H, W, 3], got "
                         f"{frames_rgb.dtype} {frames_rgb.shape}")
    h, w = pixel_hw
    return to_signed_unit(np.stack([resize_crop(f, h, w) for f in frames_rgb]))[None]


def leak_plan(schedule: schedules.Schedule, num_scales: int) -> multiscale.Plan:
    """The quantisation plan of the conditioning part: the first ``num_scales`` scales (image, or image + clip 1)."""
    return multiscale.Plan.from_schedule(schedule.scales[:num_scales], schedule.reps[:num_scales],
                                         schedule.scales_per_clip, schedule.detail_scale_min_tokens)


def leaked_bits(latent: jax.Array, schedule: schedules.Schedule, num_scales: int) -> dict[int, jax.Array]:
    """Ground-truth bits of the conditioning latent for every step of its scales (SPEC §6.6).

    ``latent``: ``[B, t, H, W, 64]`` with ``t`` = latent frames of the first ``num_scales`` scales.
    """
    res = multiscale.encode(latent, leak_plan(schedule, num_scales))
    return dict(enumerate(res.bits))


@dataclasses.dataclass
class Generator:
    """Loaded transformer + VAE (+ text encoder) for one schedule."""

    cfg: TransformerConfig
    params: Any
    vae: ChunkedVAE
    vae_variables: Any
    schedule: schedules.Schedule
    guidance: GuidanceConfig
    text_encoder: Any = None

    @classmethod
    def load(cls, ckpt, *, resolution="480p", aspect="16:9", duration=5, precision: str = "infer",
             guidance: GuidanceConfig | None = None, vae_dtype=jnp.bfloat16, decode_chunk: int = 4,
             **schedule_overrides) -> "Generator":
        """Loads the converted parts under ``ckpt`` for one schedule. ``decode_chunk``: latent frames per VAE decoder
        call after the first (``ChunkedVAE.latent_frames_per_chunk``; the reference decodes 2 at a time, which gives
        the same frames up to rounding and is slower on accelerators)."""
        parts = find_parts(ckpt)
        schedule = schedules.resolve(resolution, aspect, duration=duration, **schedule_overrides)
        if guidance is None:
            rel = schedules.released(resolution)
            guidance = GuidanceConfig(rel.get("guidance", "apg"), float(rel["cfg"]), float(rel["apg_norm_threshold"]))
        meta = checkpoint.read_meta(parts["transformer"])
        cfg = TransformerConfig.from_dict(meta["config"]).with_precision(precision)
        params = checkpoint.load_params(parts["transformer"], kind="transformer")
        params = _device_params(params, cfg, split=default_layer_loop() == "layers")
        model, variables = load_vae(parts["vae"], dtype=vae_dtype)
        text_encoder = None
        if "text_encoder" in parts:
            from infstar_jax.text import load_text_encoder

            text_encoder = load_text_encoder(parts["text_encoder"], dtype=jnp.bfloat16)
        return cls(cfg, params, ChunkedVAE(model, latent_frames_per_chunk=decode_chunk), variables, schedule, guidance,
                   text_encoder)

    @property
    def num_frames(self) -> int:
        return self.schedule.num_frames

    def encode_text(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
        from infstar_jax.text import inference_prompt

        if self.text_encoder is None:
            raise ValueError("no text encoder loaded (the checkpoint has no text_encoder/); pass text features")
        seconds = 0 if self.schedule.is_image else round((self.schedule.num_frames - 1) / schedules.FPS)
        return self.text_encoder.encode([inference_prompt(p, duration=seconds) for p in prompts])

    def conditioning(self, images=None, videos=None, keys=None) -> tuple[dict[int, jax.Array], str]:
        """Forced bits and mode for image-to-video (``images``: list of uint8 RGB images) or video continuation
        (``videos``: list of uint8 RGB ``[T, H, W, 3]`` with at least the first clip's frames)."""
        if images is None and videos is None:
            return {}, "t2i" if self.schedule.is_image else "t2v"
        if images is not None and videos is not None:
            raise ValueError("pass either images (image-to-video) or videos (video continuation), not both")
        mode = "i2v" if images is not None else "v2v"
        n_scales = self.schedule.gt_leak(mode)
        items = images if images is not None else videos
        need_frames = 1 if mode == "i2v" else schedules.video_frames_for(
            sum(self.schedule.scales[c * self.schedule.scales_per_clip][0] for c in range(2)))
        pix = []
        for i, item in enumerate(items):
            item = np.asarray(item)
            if mode == "v2v":
                if item.ndim != 4 or item.shape[0] < need_frames:
                    raise ValueError(f"video {i} has shape {item.shape}; continuation needs >= {need_frames} frames")
                item = item[:need_frames]
            elif item.ndim != 3:
                raise ValueError(f"image {i} must be [H, W, 3] uint8, got {item.shape}")
            pix.append(condition_pixels(item, self.schedule.pixel_hw))
        pixels = jnp.asarray(np.concatenate(pix))
        latent = self.vae.encode(self.vae_variables, pixels, eps=posterior_noise(keys, self.vae.latent_shape(pixels.shape)))
        return leaked_bits(latent, self.schedule, n_scales), mode

    def generate_from_features(self, text, lengths, *, seeds: Sequence[int], images=None, videos=None,
                               progress: bool = True) -> tuple[np.ndarray, SampleResult]:
        keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
        forced, mode = self.conditioning(images, videos, keys)
        log.info("sampling %d prompt(s): %s, %d AR steps", len(seeds), mode, len(self.schedule.steps()))
        sampler = Sampler(self.cfg, self.params, self.schedule, self.guidance)
        res = sampler.run(text, lengths, keys=keys, forced=forced, progress=progress)
        frames = self.vae.decode(self.vae_variables, res.summed_codes, frames=True)
        return np.asarray(frames), res

    def generate(self, prompts: Sequence[str], *, seeds: Sequence[int], images=None, videos=None,
                 progress: bool = True) -> np.ndarray:
        """``[B, T, H, W, 3]`` uint8 RGB frames (T = 1 for images)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        text, lengths = self.encode_text(prompts)
        frames, _ = self.generate_from_features(text, lengths, seeds=seeds, images=images, videos=videos,
                                                progress=progress)
        return frames


def posterior_noise(keys: jax.Array, latent_shape: Sequence[int]) -> jax.Array:
    """Per-prompt posterior noise for the conditioning encode (the reference samples the posterior there too), drawn
    from each prompt's own key so that a prompt's result does not depend on the rest of the batch."""
    draw = lambda k: jax.random.normal(jax.random.fold_in(k, 0x5EED), tuple(latent_shape[1:]), jnp.float32)  # noqa: E731
    return jax.vmap(draw)(keys)


def _device_params(params, cfg: TransformerConfig, *, split: bool):
    """Host params -> the default device, block weights in the config's storage dtype (bf16 in ``infer``: the
    reference's ``block.bfloat16()``, RNE). With ``split`` the stacked blocks are cut into per-layer buffers on the
    host and sent layer by layer (``sampler.split_layers``' form), so that the device holds the weights once."""
    bdt = cfg.jnp_block_param_dtype
    device = jax.devices()[0]
    out = {k: jax.device_put(v, device) for k, v in params.items() if k != "blocks"}
    blocks = params["blocks"]
    if not split:
        out["blocks"] = jax.device_put(jax.tree.map(lambda x: jnp.asarray(x, bdt), blocks), device)
        return out
    depth = jax.tree.leaves(blocks)[0].shape[0]
    out["layers"] = [jax.device_put(jax.tree.map(lambda x: np.asarray(x[i]).astype(bdt), blocks), device)
                     for i in range(depth)]
    return out
