"""Tokenizer training (issue 9; paper §3.2): knowledge inheritance and stochastic quantizer depth (SQD).

One train step (``train_step``, pure; jit it with the static pieces bound) on a batch of clips
``video [B, T, H, W, 3]`` in [-1, 1]:

1. **Encode**: VAE encoder -> absorbed patchify -> posterior *sample* ``mean + std * eps`` -> ``proj_down`` ->
   ``* scale`` (the reference samples in training too, ``wan_bsq_vae.py`` ``forward``).
2. **Multi-scale BSQ with straight-through gradients** (``quantize``): the clip schedule of ``multiscale.Plan``
   (clip 0 = first latent frame as an image pyramid, then spacetime pyramids), every (scale, repetition) step
   quantises ``area(target - cum)`` with BSQ; its codes ``u + stop_gradient(ẑ - u)`` are up-sampled and added to the
   clip's accumulator. ``multiscale.encode`` cannot be differentiated for this: it accumulates codes rebuilt from
   *bits* (no gradient). As the reference's ``MultiScaleBSQ`` (``remove_residual_detach=False``), the residual sees a
   detached accumulator, so each step's gradient goes straight through its own codes into the latent.
3. **SQD**: with probability ``p`` per step, ``N`` is drawn from the configured distribution and the last ``N``
   scales of *every clip* are dropped: their codes are not accumulated (the kept ones do not depend on them), the
   decoder sees the partial sum, and the dropped steps leave the BSQ losses. ``p = 0`` turns it off.
4. **Decode** the summed codes (``/ scale`` -> ``proj_up`` -> unpatchify -> decoder), raw (not clamped).
5. **Losses** (``wan_bsq_vae.py`` ``forward`` and ``utils/arguments.py`` defaults, all weights in ``LossConfig``):
   ``l1_weight * (L1 | L2)(recon, video)``; ``lfq_weight * mean over kept steps of the BSQ aux loss``
   (``0.25 commitment + 0.1 (per-sample - codebook entropy) / 100``, ``bsq.bsq_aux_losses``); optional LPIPS
   perceptual loss on the frames (``perceptual_weight``; VGG16 weights supplied by the user, see ``LPIPS``);
   optional GAN: ``-mean(D(recon frames)) * image_gan_weight * disc_factor`` for the tokenizer and
   ``d_loss(D(frames), D(recon frames)) * image_disc_weight * disc_factor`` for the patch discriminator, with
   ``disc_factor = adopt_weight(step, discriminator_iter_start, disc_warmup)``.
6. **Update**: one optax ``multi_transform`` over ``{"vae": ..., "disc": ...}``: the tokenizer's trainable params
   (Adam, clipping), its frozen params (``freeze`` prefixes such as ``encoder``: ``set_to_zero``) and the
   discriminator's (own learning-rate multiplier and clipping); optional EMA of the tokenizer params.

Randomness (posterior noise, SQD draw) comes from ``fold_in(key(seed), step)``: a resumed run draws the same.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from infstar_jax.tokenizer import discriminator as disc_lib
from infstar_jax.tokenizer.bsq import bsq_aux_losses, bsq_quantize
from infstar_jax.tokenizer.multiscale import Plan, upsample_codes
from infstar_jax.tokenizer.resample import interp_chw
from infstar_jax.tokenizer.vae import VideoVAE, posterior_from_features

log = logging.getLogger(__name__)

F32 = jnp.float32
RECON_LOSSES = ("l1", "l2")


# ----------------------------------------------------------------------------------------------------------------------
# Configuration (static: hashable, bound into the jitted step)
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss terms and weights; defaults are the reference's (``utils/arguments.py``,
    ``load_vae_bsq_wan_absorb_patchify.py``), which leave the BSQ terms (``lfq_weight``), the perceptual loss and the
    discriminator (``image_disc_weight``) off. As in the reference, ``perceptual_weight`` weighs the perceptual loss
    of images (T = 1) and ``video_perceptual_weight`` that of videos' frames (negative = ``perceptual_weight``)."""

    recon_loss_type: str = "l1"
    l1_weight: float = 4.0
    lfq_weight: float = 0.0
    commitment_loss_weight: float = 0.25
    entropy_loss_weight: float = 0.1
    inv_temperature: float = 100.0
    gamma0: float = 1.0
    gamma: float = 1.0
    zeta: float = 1.0
    perceptual_weight: float = 0.0
    video_perceptual_weight: float = -1.0
    image_gan_weight: float = 1.0
    image_disc_weight: float = 0.0
    disc_loss_type: str = "hinge"
    discriminator_iter_start: int = 0
    disc_warmup: int = 0
    remove_residual_detach: bool = False

    def __post_init__(self):
        if self.recon_loss_type not in RECON_LOSSES:
            raise ValueError(f"loss.recon_loss_type={self.recon_loss_type!r}: expected one of {RECON_LOSSES}")
        if self.disc_loss_type not in disc_lib.DISC_LOSSES:
            raise ValueError(f"loss.disc_loss_type={self.disc_loss_type!r}: expected one of {disc_lib.DISC_LOSSES}")
        for name in ("l1_weight", "lfq_weight", "perceptual_weight", "image_gan_weight", "image_disc_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name}={getattr(self, name)} must be >= 0")

    @property
    def use_disc(self) -> bool:
        return self.image_disc_weight > 0

    def perceptual_weight_for(self, num_frames: int) -> float:
        if num_frames > 1 and self.video_perceptual_weight >= 0:
            return self.video_perceptual_weight
        return self.perceptual_weight

    @property
    def use_perceptual(self) -> bool:
        return self.perceptual_weight > 0 or self.video_perceptual_weight > 0

    def bsq_kwargs(self) -> dict:
        return dict(inv_temperature=self.inv_temperature, commitment_loss_weight=self.commitment_loss_weight,
                    entropy_loss_weight=self.entropy_loss_weight, gamma0=self.gamma0, gamma=self.gamma,
                    zeta=self.zeta)


@dataclasses.dataclass(frozen=True)
class SQDConfig:
    """Stochastic quantizer depth: with probability ``prob`` per step drop the last ``N`` scales of every clip.

    ``drop_weights[i]`` is the (unnormalised) weight of ``N = i + 1``; empty = uniform over ``N = 1 .. K-1`` for
    ``K`` scales per clip (at least one scale is always kept).
    """

    prob: float = 0.0
    drop_weights: tuple[float, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "drop_weights", tuple(float(w) for w in self.drop_weights))
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"sqd.prob={self.prob} must be a probability in [0, 1]")
        if any(w < 0 or not math.isfinite(w) for w in self.drop_weights):
            raise ValueError(f"sqd.drop_weights={self.drop_weights} must be finite and >= 0")
        if self.drop_weights and sum(self.drop_weights) <= 0:
            raise ValueError(f"sqd.drop_weights={self.drop_weights} must have a positive entry")

    @property
    def enabled(self) -> bool:
        return self.prob > 0

    def drop_probs(self, scales_per_clip: int) -> np.ndarray:
        """``P(N = n | a drop)`` for ``n = 1 .. len``: ``[n_max] float64``."""
        k = int(scales_per_clip)
        w = np.asarray(self.drop_weights or [1.0] * (k - 1), np.float64)
        if len(w) == 0:
            raise ValueError(f"SQD needs at least 2 scales per clip to drop one, the schedule has {k}")
        if len(w) > k - 1:
            raise ValueError(f"sqd.drop_weights has {len(w)} entries (N = 1..{len(w)}), but with {k} scales per "
                             f"clip at most {k - 1} can be dropped (one scale is always kept)")
        return w / w.sum()

    def kept_distribution(self, scales_per_clip: int) -> np.ndarray:
        """``P(kept = k)`` for ``k = 0 .. K``: ``[K + 1] float64`` (entry 0 is always 0)."""
        k = int(scales_per_clip)
        out = np.zeros(k + 1)
        out[k] = 1.0 - self.prob
        if self.enabled:
            for n, q in enumerate(self.drop_probs(k), start=1):
                out[k - n] += self.prob * q
        return out


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Everything static about the train step besides the models, the plan and the optimizer. ``remat``: recompute
    the encoder's and the decoder's activations in the backward pass (peak memory of the larger one instead of
    both)."""

    seed: int = 0
    loss: LossConfig = LossConfig()
    sqd: SQDConfig = SQDConfig()
    ema_decay: float = 0.0
    freeze: tuple[str, ...] = ()
    remat: bool = False


@flax.struct.dataclass
class TokenizerState:
    """``step`` int32; ``params = {"vae": ..., "disc": ...}`` (``disc`` only with a discriminator); ``opt_state``
    of the one ``multi_transform``; ``ema_params``: EMA of ``params["vae"]`` or ``None``. Field names match
    ``training.state.TrainState`` so the training loop stores and restores it the same way."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any = None


# ----------------------------------------------------------------------------------------------------------------------
# SQD
# ----------------------------------------------------------------------------------------------------------------------


def draw_kept(key: jax.Array, sqd: SQDConfig, scales_per_clip: int) -> tuple[jax.Array, jax.Array]:
    """One SQD draw: ``(kept int32, dropped int32)`` scalars with ``kept = K - dropped``.

    ``u < prob`` decides whether this step drops scales; if so ``N`` comes from ``sqd.drop_probs(K)``.
    """
    k = int(scales_per_clip)
    if not sqd.enabled:
        return jnp.asarray(k, jnp.int32), jnp.asarray(0, jnp.int32)
    k_drop, k_n = jax.random.split(key)
    drop = jax.random.uniform(k_drop, (), F32) < sqd.prob
    probs = sqd.drop_probs(k)
    n = 1 + jax.random.categorical(k_n, jnp.log(jnp.asarray(probs, F32)))
    dropped = jnp.where(drop, n, 0).astype(jnp.int32)
    return (k - dropped).astype(jnp.int32), dropped


# ----------------------------------------------------------------------------------------------------------------------
# Differentiable multi-scale BSQ
# ----------------------------------------------------------------------------------------------------------------------


def scales_per_clip(plan: Plan) -> int:
    """``K``: scales of each clip (every clip of a ``Plan.from_schedule`` plan has the same number)."""
    counts = {len(plan.clip_scales(c)) for c in range(plan.num_clips)}
    if len(counts) != 1:
        raise ValueError(f"clips of this plan have different numbers of scales {sorted(counts)}")
    return counts.pop()


def relative_scale(plan: Plan) -> np.ndarray:
    """Index of each scale inside its clip: ``[num_scales] int32`` (0 = the clip's coarsest)."""
    return np.asarray([si - plan.clip_scales(plan.clips[si])[0] for si in range(plan.num_scales)], np.int32)


class QuantizeResult(NamedTuple):
    """``summed_codes [B, T, H, W, C] f32`` (the decoder's input); ``aux``: the BSQ loss terms (``bsq_aux_losses``
    names) averaged over the kept steps; ``partial_sums``: ``None`` or, per number of kept scales ``k = 1..K``,
    the summed codes of the first ``k`` scales of every clip."""

    summed_codes: jax.Array
    aux: dict
    partial_sums: tuple | None


def quantize(latent: jax.Array, plan: Plan, kept: jax.Array | int | None = None, *, loss: LossConfig = LossConfig(),
             return_partials: bool = False) -> QuantizeResult:
    """Multi-scale residual BSQ of ``latent [B, T, H, W, C]`` along ``plan`` with straight-through gradients.

    ``kept``: scales kept per clip (int or traced int32 scalar; ``None`` = all). Scale ``si`` contributes iff its
    index inside its clip is ``< kept``. Self-correction flips are a transformer-training device and do not apply.
    """
    if latent.ndim != 5 or tuple(latent.shape[1:]) != (plan.latent_frames, *plan.full_hw, plan.latent_dim):
        raise ValueError(f"quantize: latent must be [B, {plan.latent_frames}, {plan.full_hw[0]}, {plan.full_hw[1]}, "
                         f"{plan.latent_dim}] for this plan, got {tuple(latent.shape)}")
    latent = latent.astype(F32)
    k_total = scales_per_clip(plan)
    rel = relative_scale(plan)
    if kept is None:
        keep = np.ones((plan.num_scales,), np.float32)
    else:
        keep = (jnp.asarray(rel) < jnp.asarray(kept, jnp.int32)).astype(F32)
    detach = (lambda x: x) if loss.remove_residual_detach else jax.lax.stop_gradient
    aux_sum: dict[str, jax.Array] = {}
    weight = jnp.zeros((), F32)
    clip_sums, partial = [], [[] for _ in range(k_total)]
    for clip in range(plan.num_clips):
        fs, fe = plan.clip_frames(clip)
        target = latent[:, fs:fe]
        cum = jnp.zeros_like(target)
        for si in plan.clip_scales(clip):
            _, ph, pw = plan.scales[si]
            w = keep[si]
            for _ in range(plan.reps[si]):
                residual_down = interp_chw(target - detach(cum), (plan.bits[si], ph, pw), "area")
                codes, _ = bsq_quantize(residual_down)
                aux = bsq_aux_losses(residual_down, codes, **loss.bsq_kwargs())
                for name, v in aux.items():
                    aux_sum[name] = aux_sum.get(name, 0.0) + w * v
                weight = weight + w
                cum = cum + w * upsample_codes(codes, cum.shape)
            if return_partials:
                partial[rel[si]].append(cum)
        clip_sums.append(cum)
    aux_mean = {k: v / jnp.maximum(weight, 1.0) for k, v in aux_sum.items()}
    partial_sums = tuple(jnp.concatenate(p, axis=1) for p in partial) if return_partials else None
    return QuantizeResult(jnp.concatenate(clip_sums, axis=1), aux_mean, partial_sums)


# ----------------------------------------------------------------------------------------------------------------------
# The VAE around the quantiser
# ----------------------------------------------------------------------------------------------------------------------


def _encode_method(module: VideoVAE, pixels: jax.Array, key: jax.Array | None) -> jax.Array:
    enc, _ = module.encode_features(pixels)
    mean, _, std = posterior_from_features(enc)
    if key is None:
        return module.sample_to_latent(mean)
    return module.sample_to_latent(mean + std * jax.random.normal(key, mean.shape, F32))


def encode_latent(model: VideoVAE, params, pixels: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """``pixels [B, T, H, W, 3]`` in [-1, 1] -> latent ``[B, t, H/16, W/16, 4c]`` fp32 (whole sequence).

    ``key``: posterior sample ``mean + std * normal(key)`` as in training; ``None``: the posterior mean
    (deterministic, used for evaluation).
    """
    return model.apply({"params": params}, pixels, key, method=_encode_method)


def decode_codes(model: VideoVAE, params, codes: jax.Array) -> jax.Array:
    """Summed codes ``[B, t, h, w, 4c]`` -> raw pixels ``[B, T, 16h, 16w, 3]`` fp32 (not clamped)."""
    return model.apply({"params": params}, codes, method=VideoVAE.decode)


def frames_of(video: jax.Array) -> jax.Array:
    """``[B, T, H, W, C] -> [B*T, H, W, C]`` (the reference's ``B C T H W -> (B T) C H W``)."""
    return video.reshape((-1,) + video.shape[2:])


def recon_loss(recon: jax.Array, video: jax.Array, kind: str) -> jax.Array:
    """Mean absolute (``l1``) or squared (``l2``) error over every element, fp32."""
    d = recon.astype(F32) - video.astype(F32)
    return jnp.mean(jnp.abs(d)) if kind == "l1" else jnp.mean(d * d)


def psnr_batch(recon: jax.Array, video: jax.Array) -> jax.Array:
    """Mean over clips of the PSNR (dB) of clamped ``recon`` vs ``video`` (both in [-1, 1]) on the [0, 1] scale."""
    r = (jnp.clip(recon.astype(F32), -1.0, 1.0) + 1.0) / 2.0
    v = (jnp.clip(video.astype(F32), -1.0, 1.0) + 1.0) / 2.0
    mse = jnp.mean(jnp.square(r - v).reshape(r.shape[0], -1), axis=1)
    return jnp.mean(10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10)))


# ----------------------------------------------------------------------------------------------------------------------
# Perceptual loss (LPIPS with user-supplied VGG16 weights)
# ----------------------------------------------------------------------------------------------------------------------

# VGG16 ``features`` indices of the 13 convs, grouped by the LPIPS slices ending at relu1_2 .. relu5_3.
VGG_SLICES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
VGG_WIDTHS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


class LPIPS(nn.Module):
    """LPIPS (VGG16 variant, the reference's ``modules/lpips.py``): ``(x, y) [N, H, W, 3]`` in [-1, 1] ->
    ``[N]`` distances.

    Scale by the fixed shift/scale, run the VGG16 conv stack up to relu5_3, take relu1_2 .. relu5_3, normalise each
    feature vector (``f / (||f|| + 1e-10)``), square the difference, weight channels by the ``lin`` 1x1 convs, average
    over space and sum over the five layers. Weights come from ``load_lpips_params``; nothing here is trained.
    """

    dtype: Any = F32

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        shift = jnp.asarray(LPIPS_SHIFT, F32)
        scale = jnp.asarray(LPIPS_SCALE, F32)
        prec = jax.lax.Precision.HIGHEST if self.dtype == F32 else None
        n = x.shape[0]
        h = (jnp.concatenate([x, y], axis=0).astype(F32) - shift) / scale
        h = h.astype(self.dtype)
        total = jnp.zeros((n,), F32)
        for k, (idx, widths) in enumerate(zip(VGG_SLICES, VGG_WIDTHS)):
            if k:
                h = nn.max_pool(h, (2, 2), strides=(2, 2))
            for i, c in zip(idx, widths):
                h = nn.relu(nn.Conv(c, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, precision=prec,
                                    name=f"conv_{i}")(h))
            f = h.astype(F32)
            f = f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + 1e-10)
            diff = jnp.square(f[:n] - f[n:])
            lin = self.param(f"lin_{k}", nn.initializers.zeros, (f.shape[-1],), F32)
            total = total + jnp.mean(jnp.einsum("nhwc,c->nhw", diff, lin, precision=jax.lax.Precision.HIGHEST),
                                     axis=(1, 2))
        return total


def lpips_torch_keys() -> dict[str, tuple[str, ...]]:
    """Param path (``conv_{i}/kernel`` ...) -> accepted torch keys: torchvision ``features.{i}.*`` or the LPIPS
    module's ``net.slice{k}.{i}.*``, and ``lin{k}.model.1.weight`` (LPIPS ``vgg.pth``)."""
    out = {}
    for k, idx in enumerate(VGG_SLICES):
        for i in idx:
            for leaf, t in (("kernel", "weight"), ("bias", "bias")):
                out[f"conv_{i}/{leaf}"] = (f"features.{i}.{t}", f"net.slice{k + 1}.{i}.{t}")
        out[f"lin_{k}"] = (f"lin{k}.model.1.weight", f"lin{k}.weight")
    return out


def load_lpips_params(paths: Sequence[str]) -> dict:
    """LPIPS params from user-supplied torch checkpoints (``.pth`` / ``.safetensors``), e.g. torchvision's
    ``vgg16-397923af.pth`` plus LPIPS's ``vgg.pth`` (the two files the reference loads), or one file holding both.

    Raises ``ValueError`` naming every missing or mis-shaped key.
    """
    from infstar_jax.convert.common import open_source

    sources = [open_source(p) for p in paths]
    expected = jax.eval_shape(lambda: LPIPS().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                                   jnp.zeros((1, 32, 32, 3))))["params"]
    params, problems = {}, []
    for path, keys in lpips_torch_keys().items():
        found = [(s, k) for s in sources for k in keys if k in s]
        if not found:
            problems.append(f"{path}: none of {list(keys)} in {[s.description for s in sources]}")
            continue
        src, key = found[0]
        arr = np.asarray(src.load(key), np.float32)
        if path.endswith("/kernel"):
            arr = np.transpose(arr, (2, 3, 1, 0)) if arr.ndim == 4 else arr  # OIHW -> HWIO
        elif path.startswith("lin_"):
            arr = arr.reshape(-1)
        parts = path.split("/")
        node = expected
        for part in parts:
            node = node[part]
        if tuple(arr.shape) != tuple(node.shape):
            problems.append(f"{key}: shape {tuple(arr.shape)} after conversion, expected {tuple(node.shape)}")
            continue
        parent = params
        for part in parts[:-1]:
            parent = parent.setdefault(part, {})
        parent[parts[-1]] = jnp.asarray(arr)
    if problems:
        raise ValueError("the perceptual-loss weights do not fit LPIPS-VGG16:\n  " + "\n  ".join(problems))
    return params


# ----------------------------------------------------------------------------------------------------------------------
# Optimizer: trainable / frozen / discriminator groups
# ----------------------------------------------------------------------------------------------------------------------


def _path_str(path) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def param_labels(params: Mapping[str, Any], freeze: Sequence[str] = ()) -> Any:
    """Group of every leaf of ``{"vae": ..., "disc": ...}``: ``"vae"`` (trained), ``"frozen"`` (a VAE param whose
    path, e.g. ``encoder/down_blocks_0/...``, equals or starts with a ``freeze`` prefix) or ``"disc"``. Works on
    boxed (logically partitioned) trees too (a box gets one label)."""
    prefixes = tuple(p.strip("/") for p in freeze)

    def label(path, _):
        top = _path_str(path[:1])
        if top == "disc":
            return "disc"
        rest = _path_str(path[1:])
        return "frozen" if any(rest == p or rest.startswith(p + "/") for p in prefixes) else "vae"

    return jax.tree_util.tree_map_with_path(label, dict(params), is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def check_freeze(vae_params: Mapping[str, Any], freeze: Sequence[str]) -> None:
    """Raises ``ValueError`` for a ``freeze`` prefix that names no tokenizer param."""
    paths = [_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        vae_params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))[0]]
    for prefix in freeze:
        p = prefix.strip("/")
        if not any(q == p or q.startswith(p + "/") for q in paths):
            tops = sorted({q.split("/")[0] for q in paths})
            raise ValueError(f"train.freeze entry {prefix!r} matches no tokenizer parameter; parameter paths start "
                             f"with {tops} (e.g. 'encoder', 'decoder', 'encoder/down_blocks_0', 'proj_down')")


def make_optimizer(vae_tx: optax.GradientTransformation, freeze: Sequence[str] = (),
                   disc_tx: optax.GradientTransformation | None = None) -> optax.GradientTransformation:
    """One transformation over ``{"vae": ..., "disc": ...}``: ``vae_tx`` on trained tokenizer params, zero updates
    (and no optimizer state) for frozen ones, ``disc_tx`` for the discriminator."""
    transforms = {"vae": vae_tx, "frozen": optax.set_to_zero(), "disc": disc_tx or optax.set_to_zero()}
    return optax.multi_transform(transforms, lambda p: param_labels(p, freeze))


def init_state(params: Mapping[str, Any], tx: optax.GradientTransformation, *, ema: bool = False) -> TokenizerState:
    """A fresh state (step 0) around ``{"vae": ..., "disc": ...}``; the EMA starts equal to the tokenizer params."""
    return TokenizerState(step=jnp.zeros((), jnp.int32), params=dict(params), opt_state=tx.init(dict(params)),
                          ema_params=jax.tree.map(lambda p: p, params["vae"]) if ema else None)


# ----------------------------------------------------------------------------------------------------------------------
# The train step
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Models:
    """The static modules of a step: the tokenizer, and the optional discriminator and LPIPS network."""

    vae: VideoVAE
    disc: disc_lib.PatchDiscriminator | None = None
    lpips: LPIPS | None = None


def step_keys(seed: int, step: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(posterior-noise key, SQD key)`` of optimizer step ``step``: ``split(fold_in(key(seed), step))``."""
    k_eps, k_sqd = jax.random.split(jax.random.fold_in(jax.random.key(seed), step))
    return k_eps, k_sqd


def tokenizer_loss(vae_params, video: jax.Array, key: jax.Array | None, kept, *, models: Models, plan: Plan,
                   loss: LossConfig, disc_params=None, disc_factor=0.0, lpips_params=None, remat: bool = False):
    """The tokenizer's weighted loss on ``video [B, T, H, W, 3]`` and its parts.

    ``key``: posterior noise (``None`` = posterior mean); ``kept``: scales kept per clip (``None`` = all). Returns
    ``(total, (terms, bsq_aux, recon))`` with ``terms`` = ``recon_loss``, ``bsq_loss`` and, when active,
    ``perceptual_loss`` and ``g_loss``; ``recon [B, T, H, W, 3]`` raw.
    """
    encode, decode = encode_latent, decode_codes
    if remat:
        encode = jax.checkpoint(encode_latent, static_argnums=(0,))
        decode = jax.checkpoint(decode_codes, static_argnums=(0,))
    latent = encode(models.vae, vae_params, video, key)
    q = quantize(latent, plan, kept, loss=loss)
    recon = decode(models.vae, vae_params, q.summed_codes)
    terms = {"recon_loss": recon_loss(recon, video, loss.recon_loss_type) * loss.l1_weight,
             "bsq_loss": q.aux["aux_loss"] * loss.lfq_weight}
    weight = loss.perceptual_weight_for(video.shape[1])
    if models.lpips is not None and weight > 0:
        d = models.lpips.apply({"params": lpips_params}, frames_of(video), frames_of(recon))
        terms["perceptual_loss"] = jnp.mean(d) * weight
    if models.disc is not None:
        logits = models.disc.apply({"params": disc_params}, frames_of(recon))
        terms["g_loss"] = -jnp.mean(logits) * loss.image_gan_weight * disc_factor
    return sum(terms.values()), (terms, q.aux, recon)


def train_step(state: TokenizerState, batch: Mapping[str, jax.Array], lpips_params=None, *, models: Models,
               plan: Plan, tx: optax.GradientTransformation, schedule: optax.Schedule,
               options: StepOptions) -> tuple[TokenizerState, dict[str, jax.Array]]:
    """One optimizer step (pure). ``batch["video"]``: ``[B, T, H, W, 3]`` in [-1, 1] whose latent fits ``plan``;
    ``lpips_params``: the frozen perceptual network's weights (an argument, not a constant of the program).

    Metrics (fp32 scalars): ``loss`` (the tokenizer's total), ``recon_loss``, ``bsq_loss`` and the BSQ terms
    ``bsq/{commitment,per_sample_entropy,codebook_entropy}``, ``perceptual_loss``, ``g_loss``, ``d_loss``,
    ``disc_factor``, ``logits_real``/``logits_fake`` (with a discriminator), ``psnr`` (of this batch's
    reconstruction), ``grad_norm`` (trained tokenizer params, before clipping), ``lr``, ``sqd/kept`` and
    ``sqd/dropped`` (this step's draw).
    """
    lw = options.loss
    video = batch["video"].astype(F32)
    k_eps, k_sqd = step_keys(options.seed, state.step)
    kept, dropped = draw_kept(k_sqd, options.sqd, scales_per_clip(plan))
    disc_factor = disc_lib.adopt_weight(state.step, lw.discriminator_iter_start, lw.disc_warmup) \
        if models.disc is not None else jnp.zeros((), F32)
    params = state.params
    loss_fn = functools.partial(tokenizer_loss, video=video, key=k_eps, kept=kept if options.sqd.enabled else None,
                                models=models, plan=plan, loss=lw, disc_params=params.get("disc"),
                                disc_factor=disc_factor, lpips_params=lpips_params, remat=options.remat)
    (loss, (terms, aux, recon)), g_vae = jax.value_and_grad(loss_fn, has_aux=True)(params["vae"])
    grads = {"vae": g_vae}
    metrics = dict(terms, loss=loss, psnr=psnr_batch(recon, video))
    metrics.update({f"bsq/{n}": aux[n] for n in ("commitment", "per_sample_entropy", "codebook_entropy")})
    if models.disc is not None:
        fake = jax.lax.stop_gradient(frames_of(recon))

        def discriminator_loss(dp):
            real_logits = models.disc.apply({"params": dp}, frames_of(video))
            fake_logits = models.disc.apply({"params": dp}, fake)
            d = disc_lib.d_loss(lw.disc_loss_type, real_logits, fake_logits) * lw.image_disc_weight * disc_factor
            return d, (jnp.mean(real_logits), jnp.mean(fake_logits))

        (d, (real_mean, fake_mean)), grads["disc"] = jax.value_and_grad(discriminator_loss, has_aux=True)(
            params["disc"])
        metrics.update(d_loss=d, logits_real=real_mean, logits_fake=fake_mean, disc_factor=disc_factor)

    labels = param_labels(params, options.freeze)
    trained = [g for g, l in zip(jax.tree.leaves(grads["vae"]), jax.tree.leaves(labels["vae"])) if l == "vae"]
    metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(F32))) for g in trained))
    updates, opt_state = tx.update(grads, state.opt_state, params)
    new_params = optax.apply_updates(params, updates)
    ema = state.ema_params
    if ema is not None:
        d = options.ema_decay
        ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, new_params["vae"])
    metrics.update({"lr": jnp.asarray(schedule(state.step), F32), "sqd/kept": kept.astype(F32),
                    "sqd/dropped": dropped.astype(F32)})
    return TokenizerState(state.step + 1, new_params, opt_state, ema), metrics
