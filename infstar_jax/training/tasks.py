"""Training tasks: what the generic loop (``loop.py``) trains, chosen by ``config.task``.

The task interface
------------------
A task adapts one model family to the loop. The loop owns everything generic (mesh, checkpoint manager and
auto-resume, SIGTERM saves, timing, metric windows and writers, progress); a task owns its model, optimizer, data
and step. A task is constructed as ``Task(config, mesh, workdir)`` inside ``jax.set_mesh(mesh)`` and provides:

* ``abstract_state()`` -> the train state as ``jax.ShapeDtypeStruct``s carrying the current mesh's shardings (the
  restore target: a checkpoint written on any mesh is read straight into this layout). The state is a pytree with
  an int ``step`` field (``state.TrainState`` or any flax struct); the loop stores
  ``flax.serialization.to_state_dict(state)`` (via ``state.state_dict``).
* ``init_state()`` -> a fresh, sharded state (from scratch or from converted weights).
* ``data()`` -> a fresh ``grain.DatasetIterator`` of host batches with a JSON ``get_state``/``set_state`` and a
  ``skipped`` ``SkipCounter`` (the loop checkpoints the iterator with the state).
* ``step(state, batch)`` -> ``(state, metrics)``: one optimizer step (jitted, state donated); ``metrics`` is a dict
  of device scalars/small arrays, fetched by the loop only at logging time.
* ``batch_stats(batch)`` -> host numbers of a batch: ``tokens`` and ``flops`` (for tokens/s and MFU; 0 if not
  meaningful), ``shape`` (a hashable key of the compiled variant the batch uses).
* ``step_metrics(batch, metrics)`` -> ``{name: value or (value, weight)}`` averaged over the logging window.
* ``export(state, directory)``: write the trained weights for the downstream commands (sampler, converters).
* ``possible_shapes()`` (optional): the step variants that will be compiled, logged and written at the start.
* ``default_config()`` (class method): the task's config sections; ``add_training_config`` merges them.

Tasks register with ``@register("name")``; ``create(config, mesh, workdir)`` instantiates ``config.task``.
Registered here: ``"transformer"`` (the spacetime transformer from a token cache); ``"tokenizer"`` lives in
``tokenizer_task.py`` and is imported when first named (``_MODULES``).
"""

from __future__ import annotations

import abc
import importlib
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import ml_collections
import numpy as np
from ml_collections import config_dict

from infstar_jax import checkpoint, parallel
from infstar_jax.config import mesh_rules, transformer_config
from infstar_jax.data import metadata as md
from infstar_jax.data.pipeline import global_batch
from infstar_jax.training import batching, metrics as metrics_lib, state as state_lib, step as step_lib
from infstar_jax.transformer.config import TransformerConfig
from infstar_jax.transformer.model import init_params

log = logging.getLogger(__name__)

_REGISTRY: dict[str, Callable[..., "Task"]] = {}
# Tasks living in other modules, imported the first time their name is asked for.
_MODULES = {"tokenizer": "infstar_jax.training.tokenizer_task"}


def register(name: str):
    """Class decorator adding a task to the registry under ``name``."""
    def wrap(cls):
        if name in _REGISTRY:
            raise ValueError(f"task {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def task_class(name: str):
    if name not in _REGISTRY and name in _MODULES:
        importlib.import_module(_MODULES[name])
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; registered tasks: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def create(config, mesh, workdir: str) -> "Task":
    return task_class(config.get("task", "transformer"))(config, mesh, workdir)


def loop_defaults() -> dict[str, dict[str, Any]]:
    """Config sections every task shares (the loop reads them)."""
    return {
        "train": dict(steps=1000, batch_size=8, lr=4e-5, lr_schedule="constant", warmup_steps=0, end_lr_ratio=0.0,
                      b1=0.9, b2=0.97, eps=1e-8, weight_decay=0.0, grad_clip=5.0, grad_accum=1, ema_decay=0.0,
                      peak_tflops=0.0, export=True),
        "checkpoint": dict(every_steps=200, max_to_keep=3, keep_period=0, async_save=True),
        "log": dict(every_steps=10, tensorboard=True, progress=True),
    }


def add_training_config(c: ml_collections.ConfigDict, task: str = "transformer") -> ml_collections.ConfigDict:
    """Adds ``task``, ``seed`` and the loop's and the task's sections (keys already present are kept), so that
    every key can be overridden on the command line (``--config.train.lr=1e-4``)."""
    with c.unlocked():
        if "task" not in c:
            c.task = task
        if "seed" not in c:
            c.seed = 0
        sections = loop_defaults()
        for name, values in task_class(c.task).default_config().items():
            sections.setdefault(name, {}).update(values)
        for name, values in sections.items():
            if name not in c:
                c[name] = ml_collections.ConfigDict()
            for k, v in values.items():
                if k not in c[name]:
                    c[name][k] = v
    return c


class Task(abc.ABC):
    """Base class of training tasks (see the module docstring)."""

    name: ClassVar[str] = ""

    def __init__(self, config, mesh, workdir: str):
        self.config, self.mesh, self.workdir = config, mesh, workdir

    @classmethod
    def default_config(cls) -> dict[str, dict[str, Any]]:
        return {}

    @abc.abstractmethod
    def abstract_state(self) -> Any: ...

    @abc.abstractmethod
    def init_state(self) -> Any: ...

    @abc.abstractmethod
    def data(self): ...

    @abc.abstractmethod
    def step(self, state, batch) -> tuple[Any, dict[str, jax.Array]]: ...

    def batch_stats(self, batch) -> dict[str, Any]:
        return {"tokens": 0, "flops": 0.0, "shape": None}

    def step_metrics(self, batch, metrics: Mapping[str, np.ndarray]) -> dict[str, Any]:
        return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}

    def export(self, state, directory: str) -> str | None:
        return None

    def possible_shapes(self) -> list | None:
        """The compiled step variants the data can produce (objects with ``describe()`` and ``to_json()``), or
        ``None`` if the task does not know them in advance."""
        return None

    def describe(self) -> str:
        return self.name


def _arch_fields(cfg: TransformerConfig) -> dict[str, Any]:
    """Architecture fields only (precision and remat are run settings, not properties of the weights)."""
    d = cfg.to_dict()
    for k in ("dtype", "residual_dtype", "block_param_dtype", "remat"):
        d.pop(k)
    return d


@register("transformer")
class TransformerTask(Task):
    """The spacetime transformer trained from a token cache (SPEC §5, §7).

    Config: ``model``/``precision``/``remat`` (``config.transformer_config``), ``mesh``, ``schedule`` (resolution,
    optional ``num_scales``, ``image_rep``, ``video_rep``, ``semantic_scales``, ``detail_scale_min_tokens``),
    ``train`` (optimizer, self-correction, text dropout, loss weights, var-len, ``init_from``), ``data`` (token
    cache, duration rule, text buckets, reader threads).
    """

    @classmethod
    def default_config(cls):
        return {
            "train": dict(
                init_from="",  # a converted transformer (python -m infstar_jax.convert transformer); '' = scratch
                cond_drop=0.1, noise_apply_strength=0.3, noise_apply_layers=1000,
                reweight_loss_by_scale=4, max_reweight_value=40.0,
                var_len=True, var_len_outcomes=config_dict.placeholder(tuple),
                var_len_prob=config_dict.placeholder(tuple), drop_720p_last_scale=True, pad_to_multiple=128,
            ),
            "data": dict(cache="", text_buckets=batching.DEFAULT_TEXT_BUCKETS, shuffle=True, num_threads=2,
                         prefetch=2, video_frames=81, duration_resolution=1.0, min_video_frames=-1,
                         drop_long_video=False),
        }

    def __init__(self, config, mesh, workdir: str):
        super().__init__(config, mesh, workdir)
        self.model_cfg = transformer_config(config)
        self.rules = mesh_rules(config) if "rules" in config.mesh else parallel.DEFAULT_RULES
        self.seed = int(config.seed)
        self.options = batching.options_from_config(config, self.model_cfg)
        self.tx, self.schedule = state_lib.optimizer_from_config(config.train)
        self.ema = float(config.train.ema_decay) > 0
        t = config.train
        if int(t.grad_accum) < 1:
            raise ValueError(f"train.grad_accum must be >= 1, got {t.grad_accum}")
        spec = parallel.logical_to_spec(("activation_batch",), self.rules)[0]
        axes = () if spec is None else ((spec,) if isinstance(spec, str) else tuple(spec))
        shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        per_micro = int(t.batch_size) // int(t.grad_accum)
        if int(t.batch_size) % int(t.grad_accum) or per_micro % shards:
            raise ValueError(f"train.batch_size={t.batch_size} must split into grad_accum={t.grad_accum} "
                             f"micro-batches of a multiple of the {shards} batch shards of mesh axes {axes}")
        self._abstract, self.shardings = state_lib.abstract_state(self._init_params, self.tx, mesh, self.rules,
                                                                  ema=self.ema)
        self._step = step_lib.TrainStep(self.model_cfg, self.tx, self.schedule,
                                        step_lib.StepOptions(self.seed, int(t.grad_accum), float(t.ema_decay)),
                                        mesh, self.shardings, self.rules,
                                        step_lib.parse_remat_by_length(config.get("remat_by_length", "")))
        self._source = None

    def _init_params(self):
        return init_params(self.model_cfg, jax.random.key(self.seed))["params"]

    # -- state ----------------------------------------------------------------------------------------------------
    def abstract_state(self):
        return self._abstract

    def init_state(self):
        src = self.config.train.init_from
        if not src:
            log.info("initialising %s from scratch (SPEC §1.12 initialisers)", self.describe())
            state, _ = state_lib.create_sharded(self._init_params, self.tx, self.mesh, self.rules, ema=self.ema)
            return state
        meta = checkpoint.read_meta(src)
        have = TransformerConfig.from_dict(meta["config"]) if "config" in meta else None
        if have is None or _arch_fields(have) != _arch_fields(self.model_cfg):
            diff = {k: (v, _arch_fields(self.model_cfg)[k]) for k, v in _arch_fields(have).items()
                    if v != _arch_fields(self.model_cfg)[k]} if have else "no config in its metadata"
            raise ValueError(f"train.init_from={src}: its architecture differs from the configured model "
                             f"(checkpoint, config): {diff}")
        log.info("initialising from converted weights %s", src)
        params = checkpoint.load_params(src, self._abstract.params, kind="transformer")
        state, _ = state_lib.create_sharded(self._init_params, self.tx, self.mesh, self.rules, ema=self.ema,
                                            params=params)
        return state

    # -- data -----------------------------------------------------------------------------------------------------
    def source(self) -> batching.BatchSource:
        if self._source is None:
            d = self.config.data
            if not d.cache:
                raise ValueError("data.cache is empty: give the token cache folder (--config.data.cache=DIR), filled "
                                 "with `infstar_jax.data.cache.fill_cache`")
            rule = md.DurationRule(video_frames=int(d.video_frames), duration_resolution=float(d.duration_resolution),
                                   min_video_frames=int(d.min_video_frames), drop_long_video=bool(d.drop_long_video))
            self._source = batching.batch_source(
                d.cache, self.options, rule, global_batch=int(self.config.train.batch_size), seed=self.seed,
                index_path=os.path.join(self.workdir, "data_index.json"), shuffle=bool(d.shuffle),
                num_threads=int(d.num_threads), prefetch=int(d.prefetch), process_index=jax.process_index(),
                process_count=jax.process_count(), progress=jax.process_index() == 0)
        return self._source

    def data(self):
        return self.source().iterator()

    def possible_shapes(self) -> list[batching.StepShape]:
        src = self.source()
        return batching.possible_shapes(src.index, self.options, src.plan.global_batch)

    # -- step -----------------------------------------------------------------------------------------------------
    def step(self, state, batch: batching.HostBatch):
        arrays = global_batch(step_lib.device_arrays(batch.arrays), self.mesh, self.rules)
        return self._step(state, batch.shape, arrays)

    def batch_stats(self, batch: batching.HostBatch):
        tokens, flops = metrics_lib.batch_flops(self.model_cfg, batch.shape, batch.text_lens)
        return {"tokens": tokens, "flops": flops, "shape": batch.shape}

    def step_metrics(self, batch: batching.HostBatch, m: Mapping[str, np.ndarray]):
        out: dict[str, Any] = {k: float(m[k]) for k in ("loss", "acc", "grad_norm", "lr")}
        out.update(metrics_lib.scale_metrics(np.asarray(m["block_loss"]), np.asarray(m["block_acc"]), batch.shape))
        out["data/keys_crc"] = (float(batch.keys_crc()), 1.0)
        out["data/batch"] = float(batch.index)
        return out

    def export(self, state, directory: str) -> str:
        """Writes the trained weights (the EMA if kept) as a converted checkpoint ``DIRECTORY/transformer``
        (``checkpoint.load_params(..., kind="transformer")`` and the sampler read it)."""
        params = state.ema_params if state.ema_params is not None else state.params
        out = os.path.join(directory, "transformer")
        meta = {"kind": "transformer", "config": self.model_cfg.with_precision("fp32").replace(remat="none").to_dict(),
                "architecture": self.config.model.get("architecture"), "source": "infstar_jax.train",
                "step": int(state.step), "ema": state.ema_params is not None}
        checkpoint.save_params(out, params, meta, overwrite=True)
        return out

    def describe(self) -> str:
        c = self.model_cfg
        name = self.config.model.get("architecture") or "custom"
        return (f"transformer {name}: {c.depth} blocks x {c.embed_dim}, {c.num_heads}/{c.num_kv_heads} heads, "
                f"{c.num_params() / 1e6:.1f} M params, precision {self.config.precision}, remat {c.remat}")
