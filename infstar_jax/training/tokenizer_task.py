"""The ``"tokenizer"`` training task: the video tokenizer (VAE + multi-scale BSQ) trained by the shared loop.

``config.task = "tokenizer"`` selects it (``tasks.create``); the loop (checkpoints, resume, SIGTERM saves, metrics,
TensorBoard, export) is the transformer's. The step itself is ``tokenizer.train.train_step`` (issue 9: SQD,
straight-through multi-scale BSQ, reconstruction / BSQ / perceptual / GAN losses, frozen parts).

Config sections (``default_config``; every key overridable on the command line):

* ``vae``: the architecture (``VAEConfig`` fields; default the released widths), ``precision`` (``fp32`` / ``bf16``
  compute; params stay fp32), ``mesh`` (``shape``, optional ``rules``).
* ``train``: the loop's keys plus ``init_from`` (knowledge inheritance: a converted or exported VAE folder of the
  same architecture; ``''`` = from scratch, with the encoder's log-variance bias at ``scratch_logvar_bias``) and
  ``freeze`` (param-path prefixes, e.g. ``("encoder",)``), ``remat`` (recompute the encoder's and decoder's
  activations in the backward pass); optimizer
  defaults are the reference VAE trainer's (Adam, lr 1e-4, betas 0.9/0.95, clipping at 1.0).
* ``loss``: ``tokenizer.train.LossConfig`` fields, ``perceptual_weights`` (comma-separated torch/safetensors files
  with LPIPS-VGG16 weights; empty = no perceptual term, which is logged), the discriminator's ``disc_channels``,
  ``disc_layers``, ``disc_norm``, ``disc_lr_multiplier``, ``disc_grad_clip``.
* ``sqd``: ``prob`` and ``drop_weights`` (``tokenizer.train.SQDConfig``).
* ``schedule``: ``num_scales`` (``None`` = from the clip size), ``image_rep``, ``video_rep``,
  ``detail_scale_min_tokens`` (``None`` = release defaults; see ``evaluate.plan_for``).
* ``data``: ``metadata`` (jsonl file(s)/folder; native or reference format), ``root``, ``pn`` (pixel level the
  clips are resized to with their h/w template, unless ``schedule.num_scales`` fixes the size), ``video_frames``
  (frames of a clip, 16k+1), ``video_fps``, ``toy`` (> 0 and no metadata: generate that many moving-shapes videos
  of ``toy_size`` pixels into ``WORKDIR/toy_data``), ``shuffle``, ``num_threads``, ``prefetch``.
* ``eval``: ``every_steps`` (0 = never), held-out ``metadata`` or ``toy`` count (generated with seed
  ``toy_seed``, distinct from the training videos), ``num_videos``, ``batch_size``: PSNR/SSIM per number of kept
  scales logged as ``eval/psnr_k{k}``, ``eval/ssim_k{k}`` (EMA weights if kept).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_dict

from infstar_jax import checkpoint, parallel
from infstar_jax.config import mesh_rules
from infstar_jax.data import metadata as md
from infstar_jax.data import pipeline as pl
from infstar_jax.tokenizer import discriminator as disc_lib
from infstar_jax.tokenizer import evaluate as ev
from infstar_jax.tokenizer import train as tt
from infstar_jax.tokenizer.vae import VAEConfig, VideoVAE, abstract_variables, init_params
from infstar_jax.training import state as state_lib, tasks

log = logging.getLogger(__name__)

_LOSS_KEYS = tuple(f.name for f in dataclasses.fields(tt.LossConfig))


def _vae_config(c) -> VAEConfig:
    return VAEConfig.from_dict({k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in c.vae.items()})


def _tuple_or_none(v):
    return None if v is None else tuple(int(x) for x in v)


class _VideoBatches(grain.DatasetIterator):
    """Host batches ``{"video": [B, T, H, W, 3] float32}`` of a ``video_pipeline``; state = the pipeline's."""

    def __init__(self, parent: grain.DatasetIterator, skipped: pl.SkipCounter):
        super().__init__(parent)
        self.skipped = skipped

    def __next__(self) -> dict[str, np.ndarray]:
        return {"video": next(self._parent)["video"]}

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state) -> None:
        self._parent.set_state(state)


def _scratch_params(model: VideoVAE, seed: int, logvar_bias: float) -> dict:
    """Fresh tokenizer params: PyTorch's default conv/linear init (``vae.init_params``) with unit norm gains, a unit
    latent scale (``init_params`` randomises those for parity tests), and the encoder's log-variance outputs biased
    to ``logvar_bias``: with the default init the posterior noise (std ~1) drowns the mean and training first has to
    learn to silence it (knowledge inheritance starts from a trained, small variance)."""
    params = init_params(model, seed)["params"]
    c = model.config.latent_channels

    def fix(path, x):
        names = [str(getattr(p, "key", p)) for p in path]
        if names[-1] in ("gamma", "scale"):
            return jnp.ones_like(x)
        if names[:2] == ["encoder", "conv_out"] and names[-1] == "bias":
            return x.at[c:].set(logvar_bias)  # channels [mean | logvar] of the encoder output
        return x

    return jax.tree_util.tree_map_with_path(fix, params)


@tasks.register("tokenizer")
class TokenizerTask(tasks.Task):
    """The video tokenizer trained on raw clips (see the module docstring)."""

    @classmethod
    def default_config(cls):
        vae = {k: (list(v) if isinstance(v, tuple) else v) for k, v in VAEConfig().to_dict().items()}
        loss = {f.name: f.default for f in dataclasses.fields(tt.LossConfig)}
        return {
            "vae": vae,
            "mesh": {"shape": {"data": -1, "fsdp": 1, "context": 1, "tensor": 1}},
            "train": dict(lr=1e-4, b1=0.9, b2=0.95, grad_clip=1.0, weight_decay=0.0, init_from="", freeze=(),
                          scratch_logvar_bias=-6.0, remat=False),
            "loss": dict(loss, perceptual_weights="", disc_channels=64, disc_layers=3, disc_norm="group",
                         disc_lr_multiplier=1.0, disc_grad_clip=1.0),
            "sqd": dict(prob=0.0, drop_weights=()),
            "schedule": dict(num_scales=config_dict.placeholder(int), image_rep=config_dict.placeholder(tuple),
                             video_rep=config_dict.placeholder(tuple),
                             detail_scale_min_tokens=config_dict.placeholder(int)),
            "data": dict(metadata="", format="auto", root="", pn="0.40M", video_frames=81, video_fps=16, toy=0,
                         toy_size=64, toy_seed=0, shuffle=True, num_threads=2, prefetch=2),
            "eval": dict(every_steps=0, metadata="", toy=0, toy_seed=1, num_videos=16, batch_size=4),
        }

    def __init__(self, config, mesh, workdir: str):
        super().__init__(config, mesh, workdir)
        c = config
        self.vae_cfg = _vae_config(c)
        dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}.get(c.get("precision", "fp32"))
        if dtype is None:
            raise ValueError(f"precision={c.precision!r}: the tokenizer task supports 'fp32' or 'bf16' compute")
        self.model = VideoVAE(self.vae_cfg, dtype=dtype)
        self.rules = mesh_rules(c) if "rules" in c.mesh else parallel.DEFAULT_RULES
        self.seed = int(c.seed)
        loss_cfg = tt.LossConfig(**{k: c.loss[k] for k in _LOSS_KEYS})
        self.sqd = tt.SQDConfig(float(c.sqd.prob), tuple(c.sqd.drop_weights))
        self.freeze = tuple(str(p) for p in c.train.freeze)
        self.options = tt.StepOptions(seed=self.seed, loss=loss_cfg, sqd=self.sqd,
                                      ema_decay=float(c.train.ema_decay), freeze=self.freeze,
                                      remat=bool(c.train.remat))
        self.quant = ev.QuantSettings(c.schedule.num_scales, _tuple_or_none(c.schedule.image_rep),
                                      _tuple_or_none(c.schedule.video_rep), c.schedule.detail_scale_min_tokens)
        n = self.quant.num_scales
        for name in ("image_rep", "video_rep"):
            reps = getattr(self.quant, name)
            if n is not None and reps is not None and len(reps) != n:
                raise ValueError(f"schedule.{name}={list(reps)} has {len(reps)} entries, but schedule.num_scales={n} "
                                 "gives that many scales per clip")
        disc = None
        if loss_cfg.use_disc:
            disc = disc_lib.PatchDiscriminator(disc_lib.DiscConfig(int(c.loss.disc_channels), int(c.loss.disc_layers),
                                                                   str(c.loss.disc_norm)), dtype=dtype)
        lpips, self.lpips_params = None, None
        if loss_cfg.use_perceptual:
            paths = [p.strip() for p in str(c.loss.perceptual_weights).split(",") if p.strip()]
            if not paths:
                log.warning("loss.perceptual_weight=%g / video_perceptual_weight=%g but loss.perceptual_weights is "
                            "empty: no perceptual-loss backbone weights, so the perceptual term is OFF",
                            loss_cfg.perceptual_weight, loss_cfg.video_perceptual_weight)
            else:
                lpips = tt.LPIPS(dtype=dtype)
                self.lpips_params = jax.device_put(tt.load_lpips_params(paths), NamedSharding(mesh, P()))
                log.info("perceptual loss: LPIPS-VGG16 from %s, weights %g (images) / %g (videos)", paths,
                         loss_cfg.perceptual_weight, loss_cfg.perceptual_weight_for(2))
        else:
            log.info("perceptual loss off (loss.perceptual_weight and video_perceptual_weight are 0)")
        self.models = tt.Models(self.model, disc, lpips)

        t = c.train
        self.schedule = state_lib.lr_schedule(float(t.lr), kind=t.get("lr_schedule", "constant"),
                                              warmup_steps=int(t.get("warmup_steps", 0)), total_steps=int(t.steps),
                                              end_lr_ratio=float(t.get("end_lr_ratio", 0.0)))
        vae_tx = state_lib.make_optimizer(self.schedule, b1=float(t.b1), b2=float(t.b2), eps=float(t.eps),
                                          weight_decay=float(t.weight_decay), grad_clip=float(t.grad_clip))
        disc_tx = None
        if disc is not None:
            disc_schedule = lambda s: self.schedule(s) * float(c.loss.disc_lr_multiplier)  # noqa: E731
            disc_tx = state_lib.make_optimizer(disc_schedule, b1=float(t.b1), b2=float(t.b2), eps=float(t.eps),
                                               grad_clip=float(c.loss.disc_grad_clip))
        self.tx = tt.make_optimizer(vae_tx, self.freeze, disc_tx)
        boxed_vae = abstract_variables(self.model)["params"]
        tt.check_freeze(boxed_vae, self.freeze)
        self._boxed = self._boxed_state(boxed_vae)
        self.shardings = parallel.param_shardings(self._boxed, mesh, self.rules)
        self._abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      nn.unbox(self._boxed), self.shardings)
        spec = parallel.logical_to_spec(("activation_batch",), self.rules)
        self.batch_sharding = NamedSharding(mesh, spec)
        self._compiled: dict[tuple, Any] = {}
        self._plans: dict[tuple, Any] = {}
        self._host_step: int | None = None
        self._eval_clips = None
        if self.freeze:
            log.info("frozen tokenizer parts: %s", list(self.freeze))

    # -- state ------------------------------------------------------------------------------------------------------
    def _disc_init(self, key):
        size = max(64, self.models.disc.config.min_size())
        return self.models.disc.init(key, jnp.zeros((1, size, size, 3), jnp.float32))["params"]

    def _boxed_state(self, boxed_vae):
        params = {"vae": boxed_vae}
        if self.models.disc is not None:
            params["disc"] = jax.eval_shape(self._disc_init, jax.random.key(0))
        ema = self.options.ema_decay > 0
        return jax.eval_shape(lambda p: tt.init_state(p, self.tx, ema=ema), params)

    def abstract_state(self):
        return self._abstract

    def init_state(self):
        src = self.config.train.init_from
        if src:
            vae = self._inherit(src)
        else:
            log.info("initialising the tokenizer from scratch")
            vae = jax.device_put(_scratch_params(self.model, self.seed, float(self.config.train.scratch_logvar_bias)),
                                 self.shardings.params["vae"])
        params = {"vae": vae}
        if self.models.disc is not None:
            params["disc"] = jax.jit(self._disc_init, out_shardings=self.shardings.params["disc"])(
                jax.random.key(self.seed + 1))
        ema = self.options.ema_decay > 0
        make = jax.jit(lambda p: tt.init_state(p, self.tx, ema=ema), in_shardings=(self.shardings.params,),
                       out_shardings=self.shardings)
        return make(params)

    def _inherit(self, src: str):
        """Knowledge inheritance: the tokenizer params of a converted/exported VAE of the configured architecture."""
        meta = checkpoint.read_meta(src)
        if meta.get("kind") != "vae":
            raise ValueError(f"train.init_from={src} holds a {meta.get('kind')!r} checkpoint, expected a tokenizer "
                             "('vae': python -m infstar_jax.convert vae, or a tokenizer run's export/vae)")
        have = meta.get("config", {})
        want = self.vae_cfg.to_dict()
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        if diff:
            raise ValueError(f"train.init_from={src}: its architecture differs from the configured vae section "
                             f"(checkpoint, config): {diff}")
        log.info("initialising the tokenizer from %s (knowledge inheritance)", src)
        return checkpoint.load_params(src, self._abstract.params["vae"], kind="vae")

    # -- data -------------------------------------------------------------------------------------------------------
    def _rule(self) -> md.DurationRule:
        d = self.config.data
        return md.DurationRule(video_fps=int(d.video_fps), video_frames=int(d.video_frames))

    def _pn(self):
        """Size the clips are resized to: ``schedule.num_scales`` if set, else the pixel level ``data.pn``."""
        if self.quant.num_scales is not None:
            return int(self.quant.num_scales)
        pn = self.config.data.pn
        return int(pn) if str(pn).isdigit() else pn

    def _toy(self, split: str, num: int, seed: int) -> str:
        """Toy moving-shapes videos under ``WORKDIR/toy_data/SPLIT`` (generated once; deterministic)."""
        from infstar_jax.data import toy

        out = os.path.join(self.workdir, "toy_data", split)
        meta = os.path.join(out, "toy.jsonl")
        if jax.process_index() == 0 and not (os.path.exists(meta) and sum(1 for _ in open(meta)) == num):
            d = self.config.data
            size = int(d.toy_size)
            log.info("generating %d toy videos (%dx%d, %d frames, seed %d) in %s", num, size, size,
                     int(d.video_frames), seed, out)
            toy.generate(out, num, frames=int(d.video_frames), size=(size, size), seed=seed, fps=int(d.video_fps))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"toy data {split}")
        return meta

    def _samples(self, metadata: str, toy_num: int, toy_seed: int, split: str) -> md.Metadata:
        d = self.config.data
        if metadata:
            return md.load_metadata(metadata.split(","), format=d.format, rule=self._rule(), root=d.root or None)
        if toy_num > 0:
            return md.load_metadata(self._toy(split, toy_num, toy_seed), format="native", rule=self._rule())
        raise ValueError(f"no {split} data: give {'data' if split == 'train' else 'eval'}.metadata (jsonl file(s) or "
                         f"folder) or {'data' if split == 'train' else 'eval'}.toy (a number of toy videos)")

    def data(self):
        d, t = self.config.data, self.config.train
        n_proc = jax.process_count()
        if int(t.batch_size) % n_proc:
            raise ValueError(f"train.batch_size={t.batch_size} must be a multiple of the {n_proc} processes")
        samples = self._samples(d.metadata, int(d.toy), int(d.toy_seed), "train")
        options = pl.DataOptions(pn=self._pn(), spatial_stride=self.vae_cfg.spatial_factor, rule=self._rule(), seed=self.seed, shuffle=bool(d.shuffle),
                                 batch_size=int(t.batch_size) // n_proc, num_threads=int(d.num_threads),
                                 prefetch=int(d.prefetch))
        pipe = pl.video_pipeline(samples, options)
        return _VideoBatches(iter(pipe), pipe.skipped)

    # -- step -------------------------------------------------------------------------------------------------------
    def plan(self, video_shape) -> Any:
        """The quantisation plan of clips of ``video_shape = (B, T, H, W, 3)`` (cached per shape)."""
        key = tuple(video_shape[1:4])
        if key not in self._plans:
            sched, plan = ev.plan_for(*key, self.quant, self.vae_cfg.spatial_factor)
            if self.sqd.enabled:
                self.sqd.drop_probs(tt.scales_per_clip(plan))  # fail fast on weights the schedule cannot take
            log.info("clips of %dx%dx%d: %d scales per clip %s, repetitions %s", *key, sched.scales_per_clip,
                     [s[1:] for s in sched.scales[:sched.scales_per_clip]], list(sched.reps))
            self._plans[key] = plan
        return self._plans[key]

    def function(self, video_shape):
        key = tuple(video_shape)
        fn = self._compiled.get(key)
        if fn is None:
            f = functools.partial(tt.train_step, models=self.models, plan=self.plan(video_shape), tx=self.tx,
                                  schedule=self.schedule, options=self.options)

            def step(state, batch, lpips_params):
                with nn.logical_axis_rules(self.rules):
                    return f(state, batch, lpips_params)

            replicated = NamedSharding(self.mesh, P())
            lp = None if self.lpips_params is None else jax.tree.map(lambda _: replicated, self.lpips_params)
            fn = jax.jit(step, in_shardings=(self.shardings, {"video": self.batch_sharding}, lp),
                         out_shardings=(self.shardings, replicated), donate_argnums=(0,))
            self._compiled[key] = fn
        return fn

    def step(self, state, batch):
        arrays = pl.global_batch(batch, self.mesh, self.rules)
        if self._host_step is None:
            self._host_step = int(jax.device_get(state.step))
        state, metrics = self.function(arrays["video"].shape)(state, arrays, self.lpips_params)
        self._host_step += 1
        every = int(self.config.eval.every_steps)
        if every > 0 and self._host_step % every == 0:
            metrics = dict(metrics, **self.evaluate(state))
        return state, metrics

    def batch_stats(self, batch):
        return {"tokens": 0, "flops": 0.0, "shape": tuple(np.shape(batch["video"]))}

    def step_metrics(self, batch, m: Mapping[str, np.ndarray]):
        return {k: float(v) for k, v in m.items() if np.ndim(v) == 0}

    # -- evaluation and export ----------------------------------------------------------------------------------------
    def eval_clips(self) -> np.ndarray:
        """The held-out clips ``[N, T, H, W, 3]`` (loaded once)."""
        if self._eval_clips is None:
            e = self.config.eval
            samples = self._samples(e.metadata, int(e.toy), int(e.toy_seed), "heldout").samples
            paths = [s.path for s in samples if s.kind == "video"]
            self._eval_clips = ev.load_clips(paths, int(self.config.data.video_frames), self._pn(),
                                             int(e.num_videos), self.vae_cfg.spatial_factor)
            log.info("held-out set: %d clips of %s", len(self._eval_clips), self._eval_clips.shape[1:])
        return self._eval_clips

    def eval_params(self, state):
        return state.ema_params if state.ema_params is not None else state.params["vae"]

    def evaluate(self, state) -> dict[str, float]:
        """``eval/psnr_k{k}`` and ``eval/ssim_k{k}`` on the held-out clips for ``k = 1..K``."""
        clips = self.eval_clips()
        plan = self.plan(clips.shape)
        params = jax.device_put(self.eval_params(state), NamedSharding(self.mesh, P()))
        rows = ev.scale_table(self.model, params, clips, plan, int(self.config.eval.batch_size))
        out = {}
        for r in rows:
            out[f"eval/psnr_k{r['scales']}"] = r["psnr"]
            out[f"eval/ssim_k{r['scales']}"] = r["ssim"]
        log.info("held-out reconstruction: %s", ", ".join(f"k={r['scales']}: {r['psnr']:.2f} dB / {r['ssim']:.3f}"
                                                          for r in rows))
        return out

    def export(self, state, directory: str) -> str:
        """Writes the tokenizer (the EMA if kept) as ``DIRECTORY/vae``, loadable with ``tokenizer.vae.load_vae``
        and evaluated by ``python -m infstar_jax.tokenizer.evaluate``; ``quantization`` records the schedule
        settings it was trained with."""
        out = os.path.join(directory, "vae")
        meta = {"kind": "vae", "config": self.vae_cfg.to_dict(), "source": "infstar_jax.train (tokenizer)",
                "step": int(jax.device_get(state.step)), "ema": state.ema_params is not None,
                "quantization": self.quant.to_dict(), "sqd": {"prob": self.sqd.prob,
                                                              "drop_weights": list(self.sqd.drop_weights)}}
        checkpoint.save_params(out, self.eval_params(state), meta, overwrite=True)
        return out

    def describe(self) -> str:
        c = self.vae_cfg
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self._abstract.params["vae"]))
        parts = [f"tokenizer: widths {list(c.block_out_channels)}, {c.layers_per_block} layers per block, "
                 f"{n / 1e6:.2f} M params, precision {self.config.get('precision', 'fp32')}",
                 f"SQD p={self.sqd.prob}" + (f" weights {list(self.sqd.drop_weights) or 'uniform'}"
                                             if self.sqd.enabled else " (off)")]
        if self.models.disc is not None:
            parts.append(f"patch discriminator from step {self.options.loss.discriminator_iter_start}")
        return ", ".join(parts)
