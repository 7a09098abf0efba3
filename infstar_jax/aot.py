"""Ahead-of-time compilation for TPU pod topologies, on any host (no TPU needed; libtpu must be installed).

``python -m infstar_jax.aot --config configs/infinity_qwen8b.py --topology v5p:4x4x2 [--mesh fsdp=16,tensor=2]
[--what train|sample|all] [--out FILE] [--json FILE]``

For the named topology (``v4:2x2x1``, ``v5e:2x4``, ``v5p:4x4x2``, ``v6e:8x8``; or a slice name such as ``v5p-64``,
``v6e-64``, ``v5e-8``) the TPU compiler (libtpu) describes the chips; the programs are traced on abstract inputs
(``jax.ShapeDtypeStruct`` with shardings: nothing is allocated), lowered, and compiled exactly as they would be on the
pod. For each program a table row gives the per-chip argument / output / temp / total bytes against the chip's HBM,
the FLOPs per chip, the bytes entering each kind of collective, the compile time and a verdict (fits, or does not fit
and by how much). The serialized executables can be written (``--out``) for a launch to load instead of compiling.

Programs: ``train`` = one optimizer step of the trainer at the longest packed sequence of the config's schedule;
``sample`` = the sampler's text step and its largest visual step (the last scale; 2 rows per prompt for guidance).

Exit status: 0 every program fits, 3 a program does not fit (or failed to compile), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import math
import os
import pickle
import re
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, Callable

# libtpu takes a machine-wide lock file unless told that several processes may load it; compiling for a topology
# never touches a TPU, so concurrent compiles (and other JAX processes on the host) are safe.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from infstar_jax import parallel, schedules  # noqa: E402
from infstar_jax import config as config_lib  # noqa: E402

log = logging.getLogger(__name__)

GIB = 1024**3

# HBM per chip (GiB) and the TPU generation's device_kind as libtpu reports it.
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
DEVICE_KIND = {"v4": "TPU v4", "v5e": "TPU v5 lite", "v5p": "TPU v5", "v6e": "TPU v6 lite"}
# Torus dimensions of a topology name: v4/v5p are 3-D (AxBxC chips), v5e/v6e 2-D (AxB chips).
TOPOLOGY_DIMS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}
GENERATION_ALIASES = {"v4": "v4", "v5p": "v5p", "v5e": "v5e", "v5litepod": "v5e", "v6e": "v6e"}
# Slice names (Cloud TPU accelerator types) -> topology. v4/v5p names count TensorCores (2 per chip), v5e/v6e chips.
SLICE_TOPOLOGIES = {
    **{f"v5e-{n}": f"v5e:{s}" for n, s in [(1, "1x1"), (4, "2x2"), (8, "2x4"), (16, "4x4"), (32, "4x8"), (64, "8x8"),
                                           (128, "8x16"), (256, "16x16")]},
    **{f"v6e-{n}": f"v6e:{s}" for n, s in [(1, "1x1"), (4, "2x2"), (8, "2x4"), (16, "4x4"), (32, "4x8"), (64, "8x8"),
                                           (128, "8x16"), (256, "16x16")]},
    **{f"{g}-{n}": f"{g}:{s}" for g in ("v4", "v5p") for n, s in [(8, "2x2x1"), (16, "2x2x2"), (32, "2x2x4"),
                                                                  (64, "4x4x2"), (128, "4x4x4"), (256, "4x4x8"),
                                                                  (512, "4x8x8"), (1024, "8x8x8")]},
}
SLICE_TOPOLOGIES.update({k.replace("v5e-", "v5litepod-"): v for k, v in SLICE_TOPOLOGIES.items()
                         if k.startswith("v5e")})

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
EXIT_DOES_NOT_FIT = 3
# Device arrays of a train batch (``training.step.DEVICE_KEYS``).
_TRAIN_BATCH_KEYS = ("latent", "text", "uncond_rows", "key_valid", "positions", "repeat_idx", "flip_probs",
                     "row_weight")


class AotError(ValueError):
    """A user-facing error: bad topology, mesh, config, or libtpu missing."""


# ---------------------------------------------------------------------------------------------------------------
# Topologies and meshes
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice: generation (``v4``/``v5e``/``v5p``/``v6e``) and torus shape in chips."""

    generation: str
    shape: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def chips(self) -> int:
        return int(np.prod(self.shape))

    @property
    def hbm_bytes(self) -> int:
        return HBM_GIB[self.generation] * GIB


def _valid_topologies_text() -> str:
    return (
        "valid: GEN:AxB for v5e/v6e (e.g. v5e:2x2, v5e:2x4, v6e:8x8), GEN:AxBxC for v4/v5p (e.g. v4:2x2x1, "
        "v5p:2x2x1, v5p:4x4x2, v5p:4x4x4), or a slice name: " + ", ".join(sorted(SLICE_TOPOLOGIES, key=_slice_key))
    )


def _slice_key(name: str):
    gen, n = name.rsplit("-", 1)
    return gen, int(n)


def parse_topology(name: str) -> Topology:
    """``"v5p:4x4x2"`` / ``"v5p-64"`` -> ``Topology``; anything else is refused with the list of valid forms."""
    text = str(name).strip().lower()
    text = SLICE_TOPOLOGIES.get(text, text)
    m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", text)
    if not m or m.group(1) not in GENERATION_ALIASES:
        raise AotError(f"unknown TPU topology {name!r}; {_valid_topologies_text()}")
    gen = GENERATION_ALIASES[m.group(1)]
    shape = tuple(int(x) for x in m.group(2).split("x"))
    if len(shape) != TOPOLOGY_DIMS[gen] or min(shape) < 1:
        raise AotError(f"TPU topology {name!r}: {gen} slices are {TOPOLOGY_DIMS[gen]}-D; {_valid_topologies_text()}")
    return Topology(gen, shape)


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def topology_devices(topology: Topology) -> list:
    """The topology's devices (one per chip) as libtpu describes them."""
    if not libtpu_available():
        raise AotError(
            "compiling for a TPU topology needs libtpu (pip install 'infstar-jax[test]' or the libtpu version that "
            f"matches jax {jax.__version__}, see `pip install jax[tpu]`); it is not installed"
        )
    from jax.experimental import topologies

    kw = {"chip_config_name": "megacore"} if topology.generation == "v4" else {}
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology.name, **kw)
    except Exception as e:  # libtpu refuses shapes it cannot build (e.g. not a multiple of a host's chips)
        raise AotError(f"libtpu refused topology {topology.name!r}: {e}; {_valid_topologies_text()}") from e
    devices = list(desc.devices)
    kind = devices[0].device_kind
    if kind != DEVICE_KIND[topology.generation] or len(devices) != topology.chips:
        raise AotError(
            f"libtpu built {len(devices)} devices of kind {kind!r} for {topology.name!r}; expected {topology.chips} "
            f"of kind {DEVICE_KIND[topology.generation]!r}"
        )
    return devices


def parse_mesh(text: str | None) -> dict[str, int] | None:
    """``"fsdp=16,tensor=4"`` -> ``{"fsdp": 16, "tensor": 4}`` (axes left out are 1; one may be -1)."""
    if text is None or not str(text).strip():
        return None
    out = {}
    for part in str(text).split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in parallel.MESH_AXES or not re.fullmatch(r"-?\d+", value.strip()):
            raise AotError(f"bad mesh {text!r}: expected comma-separated AXIS=SIZE with AXIS in {parallel.MESH_AXES}, "
                           "e.g. fsdp=16,tensor=4")
        out[key] = int(value)
    return out


def mesh_constraints(cfg) -> dict[str, tuple[int, ...]]:
    """Dimensions each mesh axis must divide for the model's parameters to shard evenly."""
    return {"tensor": (cfg.num_heads, cfg.num_kv_heads, cfg.mlp_dim), "fsdp": (cfg.embed_dim,)}


def valid_meshes(n: int, cfg, limit: int = 12) -> list[dict[str, int]]:
    """Meshes over ``n`` devices (data=1, context=1) whose fsdp/tensor sizes divide the model's dimensions."""
    cons = mesh_constraints(cfg)
    out = []
    for t in range(1, n + 1):
        if n % t or any(d % t for d in cons["tensor"]) or any(d % (n // t) for d in cons["fsdp"]):
            continue
        out.append({"fsdp": n // t, "tensor": t} if t > 1 else {"fsdp": n})
    return out[:limit]


def _mesh_text(shape: Mapping[str, int]) -> str:
    return ",".join(f"{a}={shape[a]}" for a in parallel.MESH_AXES if shape.get(a, 1) != 1) or "fsdp=1"


def build_mesh(devices: Sequence[Any], shape: Mapping[str, int] | None, cfg) -> Mesh:
    """The 4-axis mesh over the topology's devices; refuses sizes that do not multiply to the device count or that
    do not divide the model's sharded dimensions, listing meshes that work."""
    n = len(devices)
    shape = dict(shape or {"fsdp": -1})
    sizes = [int(shape.get(a, 1)) for a in parallel.MESH_AXES]
    hint = "valid meshes for this model on {} chips: {}".format(
        n, "; ".join(_mesh_text(m) for m in valid_meshes(n, cfg)) or "none with data=context=1")
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise AotError(f"mesh {shape}: sizes must be positive (one may be -1); {hint}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n % known:
            raise AotError(f"mesh {_mesh_text(shape)} does not divide the {n} chips of the topology; {hint}")
        sizes[sizes.index(-1)] = n // known
    if int(np.prod(sizes)) != n:
        raise AotError(f"mesh {_mesh_text(dict(zip(parallel.MESH_AXES, sizes)))} has {int(np.prod(sizes))} devices, "
                       f"the topology has {n}; {hint}")
    resolved = dict(zip(parallel.MESH_AXES, sizes))
    for axis, dims in mesh_constraints(cfg).items():
        bad = [d for d in dims if d % resolved[axis]]
        if bad:
            raise AotError(f"mesh {_mesh_text(resolved)}: {axis}={resolved[axis]} does not divide the model "
                           f"dimensions {bad}; {hint}")
    try:
        return parallel.make_mesh(resolved, devices=devices)
    except NotImplementedError:
        # jax's torus-aware placement covers only some shapes; otherwise let mesh axes split physical axes.
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(tuple(sizes), devices=devices, allow_split_physical_axes=True)
        return Mesh(arr, parallel.MESH_AXES, axis_types=(AxisType.Auto,) * len(parallel.MESH_AXES))


# ---------------------------------------------------------------------------------------------------------------
# Config loading
# ---------------------------------------------------------------------------------------------------------------


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``"configs/x.py"`` or ``"configs/x.py:arg"`` -> ``get_config(arg)`` of that file."""
    path, _, arg = str(spec).partition(":")
    if not os.path.isfile(path):
        raise AotError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"_infstar_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AotError(f"config file {path!r} has no get_config()")
    return module.get_config(arg) if arg else module.get_config()


def with_training_sections(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config completed with the trainer's sections (``train``, ``data``, ...), as the train CLI does, so that
    ``--set train.batch_size=...`` overrides work on any preset."""
    from infstar_jax.training import tasks

    return tasks.add_training_config(config)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """``["precision=infer", "schedule.duration=10"]`` (values parsed as JSON, else kept as strings)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise AotError(f"override {item!r}: expected KEY=VALUE")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        node = config
        parts = key.split(".")
        for p in parts[:-1]:
            if p not in node:
                raise AotError(f"override {item!r}: config has no section {p!r}")
            node = node[p]
        if parts[-1] not in node:
            raise AotError(f"override {item!r}: config has no field {key!r}")
        with config.unlocked():
            node[parts[-1]] = parsed
    return config


# ---------------------------------------------------------------------------------------------------------------
# Abstract inputs with shardings
# ---------------------------------------------------------------------------------------------------------------


def _spec_for(mesh: Mesh, shape: Sequence[int], names: Sequence[str | None], rules) -> P:
    """PartitionSpec of logical ``names``, dropping mesh axes that do not divide the dimension."""
    return parallel.fitted_spec(shape, names, mesh, rules)


def abstract(shape, dtype, mesh: Mesh, names: Sequence[str | None], rules) -> jax.ShapeDtypeStruct:
    """A sharded abstract array (no allocation)."""
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=NamedSharding(mesh, _spec_for(mesh, shape, names, rules)))


@dataclasses.dataclass
class Program:
    """A function to lower and compile with abstract arguments."""

    name: str
    fn: Any  # a jax.jit-wrapped function
    args: tuple
    kwargs: dict
    description: str
    attention_flops: float = 0.0  # per chip, of the Pallas attention kernels (opaque to XLA's FLOP count)


# ---------------------------------------------------------------------------------------------------------------
# Programs: train step and sampler steps
# ---------------------------------------------------------------------------------------------------------------


def attention_flops_per_chip(cfg, mesh: Mesh, rules, rows: int, pairs: int, passes: float) -> float:
    """FLOPs per chip of the attention kernels: ``4 * head_dim * heads`` per visible (query, key) pair per layer and
    forward pass, ``passes`` forward-equivalents (1 forward; 3 forward + backward; +1 when remat recomputes), split
    over the batch and head shards the kernel actually runs on (see ``splash.shard_axes``)."""
    from infstar_jax.transformer import splash

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        batch_axes, head_axes = splash.shard_axes(rows, cfg.num_heads, cfg.num_kv_heads)

    def size(axes):
        if axes is None:
            return 1
        return int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))

    total = 4.0 * cfg.head_dim * cfg.num_heads * cfg.depth * pairs * rows * passes
    return total / (size(batch_axes) * size(head_axes))


def _model_cfg(config, precision: str | None = None):
    cfg = config_lib.transformer_config(config)
    return cfg.with_precision(precision) if precision else cfg


def sample_programs(config, mesh: Mesh, *, prompts: int = 1, precision: str = "infer") -> list[Program]:
    """The sampler's text step and its largest visual step (most query tokens; ties: most cached keys)."""
    from infstar_jax.sampling import sampler as sampler_lib
    from infstar_jax.tokenizer import multiscale
    from infstar_jax.transformer.model import init_params

    cfg = _model_cfg(config, precision)
    rules = config_lib.mesh_rules(config)
    sched = config_lib.sampling_schedule(config)
    boxed = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))["params"])
    params = parallel.abstract_sharded(boxed, mesh, rules)
    b, rows, lt = prompts, 2 * prompts, cfg.text_maxlen
    row_names = ("activation_batch", "activation_length")
    text = abstract((b, lt, cfg.text_dim), jnp.float32, mesh, (*row_names, None), rules)
    text_valid = abstract((b, lt), jnp.bool_, mesh, row_names, rules)
    text_fn = sampler_lib._text_step
    text_kv = jax.eval_shape(lambda p, t, v: text_fn(p, t, v, cfg=cfg), params, text, text_valid)

    steps = sched.steps()
    step = max(steps, key=lambda s: (s.tokens, s.ref_tokens))
    plan = multiscale.Plan.from_schedule(sched.scales, sched.reps, sched.scales_per_clip, sched.detail_scale_min_tokens)
    cum_shape = jax.eval_shape(lambda: multiscale.init_accumulator(plan, step.clip, b)).shape
    lp = step.ref_tokens + lt
    kv_names = ("layers", "activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")
    kv_shape = (cfg.depth, rows, lp, cfg.num_kv_heads, cfg.head_dim)
    referenced = {r for s in steps for r in s.ref_sids}
    spec = sampler_lib._StepSpec(
        shape=step.shape, bits=step.bits, head_detail=step.head_detail, zero_input=step.zero_input,
        write_kv=step.last_rep and step.si in referenced, guidance=sampler_lib.GuidanceConfig(),
        given_uniforms=False, record=False,
    )
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), b))
    args = (
        params,
        abstract(cum_shape, jnp.float32, mesh, ("activation_batch",), rules),
        abstract((step.tokens, 4), jnp.int32, mesh, (), rules),
        abstract(kv_shape, text_kv[0].dtype, mesh, kv_names, rules),
        abstract(kv_shape, text_kv[1].dtype, mesh, kv_names, rules),
        abstract((rows, lp), jnp.bool_, mesh, row_names, rules),
        abstract((), jnp.float32, mesh, (), rules),
        jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=NamedSharding(mesh, P())),
        abstract((), jnp.int32, mesh, (), rules),
        abstract((), jnp.bool_, mesh, (), rules),
        abstract((b, *step.shape, step.bits), jnp.uint8, mesh, ("activation_batch",), rules),
    )
    pt, ph, pw = step.shape
    return [
        Program("sample_text", text_fn, (params, text, text_valid), dict(cfg=cfg),
                f"text step: {rows} rows x {lt} tokens",
                attention_flops_per_chip(cfg, mesh, rules, rows, lt * lt, 1.0)),
        Program("sample_largest", sampler_lib._visual_step, args, dict(cfg=cfg, spec=spec),
                f"step {step.index} (scale {step.si} {pt}x{ph}x{pw}): {rows} rows x {step.tokens} queries, "
                f"keys {step.tokens} + {step.ref_tokens} ref + {lt} text",
                attention_flops_per_chip(cfg, mesh, rules, rows, step.tokens * (step.tokens + lp), 1.0)),
    ]


def train_step_shape(config, rows: int):
    """The trainer's step shape for the longest packed rows of the config's schedule (resolution, aspect, duration):
    the var-len outcome with the most tokens and the largest text bucket (SPEC §7.3)."""
    from infstar_jax.training import batching

    options = batching.options_from_config(config, _model_cfg(config))
    s = config.schedule
    template = schedules.nearest_template(schedules.parse_aspect(s.get("aspect") or "16:9"))
    pt = schedules.latent_frames(16 * int(s.duration) + 1)
    sched = batching.resolve_schedule(options, template, pt)
    try:
        outs, _ = batching.outcomes(options, sched)
    except ValueError as e:
        raise AotError(f"the trainer cannot draw var-len outcomes for this schedule ({e}); train it with "
                       "--set train.var_len=false or give train.var_len_outcomes") from e
    kept = max(outs, key=lambda o: sum(int(np.prod(sched.scales[i])) for i in o))
    # Captions are cut at the model's text length, so the largest bucket used is the last one that fits it.
    slot = max([b for b in options.text_buckets if b <= options.text_maxlen] or [options.text_buckets[0]])
    return batching.step_shape(options, sched, kept, slot, rows)


def train_programs(config, mesh: Mesh, *, batch: int | None = None, precision: str | None = None) -> list[Program]:
    """The trainer's jitted step (``training.step.TrainStep``, exactly as ``training.loop`` builds it) for the
    longest packed rows of the config's schedule; ``batch`` global rows (default: the config's ``train.batch_size``,
    which the trainer requires to be a multiple of the batch shards)."""
    from infstar_jax.training import batching, tasks

    config = tasks.add_training_config(ml_collections.ConfigDict(config.to_dict()))
    if precision:
        config.precision = precision
    rows = int(batch or config.train.batch_size)
    config.train.batch_size = rows
    try:
        with jax.set_mesh(mesh):
            task = tasks.create(config, mesh, workdir="")
    except ValueError as e:  # e.g. a batch that does not split over the batch shards
        raise AotError(f"the trainer refuses this configuration: {e}") from e
    rules = task.rules
    shape = train_step_shape(config, rows)
    fn = task._step.function(shape)
    per_row = batching.row_arrays(shape, None, None, np.random.default_rng(0), task.options)
    batch_sharding = task._step.batch_sharding
    arrays = {k: jax.ShapeDtypeStruct((rows, *np.shape(per_row[k])), np.asarray(per_row[k]).dtype,
                                      sharding=batch_sharding) for k in _TRAIN_BATCH_KEYS}
    cfg = task.model_cfg
    layout = shape.packing.layout
    pairs = sum(n * sum(layout.lengths[j] for j in row) for n, row in zip(layout.lengths, layout.sees))
    passes = 3.0 + (cfg.remat != "none")
    return [Program(
        "train_step", fn, (task.abstract_state(), arrays), {},
        f"{shape.describe()}; {cfg.dtype} matmuls, remat={cfg.remat}, grad_accum={config.train.grad_accum}",
        attention_flops_per_chip(cfg, mesh, rules, rows, pairs, passes))]


# ---------------------------------------------------------------------------------------------------------------
# Compile and report
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Report:
    """Per-chip numbers of one compiled program (bytes unless named otherwise)."""

    program: str
    description: str
    topology: str
    mesh: str
    hbm: int
    compile_seconds: float
    fits: bool
    argument: int | None = None
    output: int | None = None
    alias: int | None = None
    temp: int | None = None
    code: int | None = None
    total: int | None = None
    flops: float | None = None
    matmul_flops: float | None = None
    attention_flops: float | None = None
    collectives: dict = dataclasses.field(default_factory=dict)
    unknown_loops: int = 0
    available: int | None = None  # usable HBM the compiler reported when it refused the program
    error: str | None = None

    @property
    def verdict(self) -> str:
        if self.error and self.total is None:
            return "does not compile: " + self.error.splitlines()[0][:200]
        if self.fits:
            return f"fits ({_size(self.hbm - self.total)} free)"
        if self.available is not None:
            return (f"does not fit: needs {_size(self.total)}, the compiler has {_size(self.available)} "
                    f"(over by {_size(self.total - self.available)})")
        return f"does not fit: over by {_size(self.total - self.hbm)}"

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["verdict"] = self.verdict
        return d


def _size(n: int | float | None) -> str:
    """Bytes as GiB (>= 1 GiB) or MiB."""
    if n is None:
        return "-"
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / 1024**2:.1f} MiB"


_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5, "s2": 0.25, "u2": 0.25,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e4m3": 1, "f8e3m4": 1,
    "f4e2m1fn": 0.5, "f8e8m0fnu": 1, "token": 0,
}
_ARRAY_RE = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_COMP_RE = re.compile(r"^\s*(ENTRY\s+)?%?([^\s(]+)\s*\(.*->.*\{\s*$")


@dataclasses.dataclass
class _Instr:
    name: str
    type_text: str
    opcode: str
    call: str  # from the opcode to the end of the line


def _arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY_RE.findall(type_text)
            if dt in _DTYPE_BYTES]


def _type_bytes(type_text: str) -> int:
    return int(sum(_DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in _arrays(type_text)))


def _split_type(rest: str) -> tuple[str, str]:
    """``"(f32[2], s32[]) tuple(...)"`` -> (type text, remainder starting at the opcode)."""
    rest = rest.strip()
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1:].strip()
    head, _, tail = rest.partition(" ")
    return head, tail.strip()


def _operands(call: str) -> list[str]:
    """Names of the operands in ``opcode(%a, %b, ...), attrs``."""
    start = call.find("(")
    if start < 0:
        return []
    depth, end = 0, len(call)
    for i in range(start, len(call)):
        depth += call[i] in "({["
        depth -= call[i] in ")}]"
        if depth == 0:
            end = i
            break
    return re.findall(r"%([^\s,()]+)", call[start + 1: end])


class HloModule:
    """Just enough of a parser of compiled HLO text to count collectives and matmul FLOPs per execution.

    Scheduled TPU HLO keeps the scanned layers as ``while`` loops whose bodies the XLA cost analysis counts once;
    here every computation gets its execution count (loop bodies times their trip count, read from the loop
    condition's bound and the counter's initial constant).
    """

    def __init__(self, text: str):
        self.comps: dict[str, list[_Instr]] = {}
        self.types: dict[str, str] = {}
        self.entry = None
        current = None
        for line in text.splitlines():
            m = _COMP_RE.match(line)
            if m and "=" not in line.split("(", 1)[0]:
                current = m.group(2)
                self.comps[current] = []
                if m.group(1):
                    self.entry = current
                continue
            if current is None:
                continue
            if line.strip() == "}":
                current = None
                continue
            im = _INSTR_RE.match(line)
            if not im:
                continue
            type_text, call = _split_type(im.group(2))
            instr = _Instr(im.group(1), type_text, call.split("(", 1)[0].strip(), call)
            self.types[instr.name] = type_text
            self.comps[current].append(instr)
        self.unknown_trip_counts = 0
        self.times = self._multiplicity()

    def _constant(self, comp: str, name: str, depth: int = 0) -> int | None:
        """Integer value of ``name`` in ``comp`` if it is a constant (looking through copies and conversions)."""
        ins = next((i for i in self.comps.get(comp, []) if i.name == name), None)
        if ins is None or depth > 8:
            return None
        if ins.opcode == "constant":
            m = re.match(r"constant\((-?\d+)\)", ins.call)
            return int(m.group(1)) if m else None
        if ins.opcode in ("copy", "convert", "bitcast", "reshape"):
            ops = _operands(ins.call)
            return self._constant(comp, ops[0], depth + 1) if ops else None
        return None

    def _trip_count(self, caller: str, ins: _Instr) -> int | None:
        """Trip count of a counted ``while``: condition ``counter <op> bound``, body ``counter + step``."""
        cond = re.search(r"condition=%?([^\s,}]+)", ins.call)
        body = re.search(r"body=%?([^\s,}]+)", ins.call)
        if not cond or cond.group(1) not in self.comps or not body or body.group(1) not in self.comps:
            return None
        cname, bname = cond.group(1), body.group(1)
        compare = next((i for i in reversed(self.comps[cname]) if i.opcode == "compare"), None)
        if compare is None:
            return None
        direction = re.search(r"direction=(\w+)", compare.call)
        ops = _operands(compare.call)
        if len(ops) != 2 or not direction:
            return None
        bound = self._constant(cname, ops[1])
        gte = next((i for i in self.comps[cname] if i.name == ops[0] and i.opcode == "get-tuple-element"), None)
        if bound is None or gte is None:
            return None
        index = int(re.search(r"index=(\d+)", gte.call).group(1))
        # Step: the body's root tuple carries counter + constant.
        root = self.comps[bname][-1]
        elems = _operands(root.call) if root.opcode == "tuple" else []
        step = None
        if index < len(elems):
            upd = next((i for i in self.comps[bname] if i.name == elems[index]), None)
            if upd is not None and upd.opcode == "add":
                consts = [self._constant(bname, o) for o in _operands(upd.call)]
                step = next((c for c in consts if c is not None), None)
        if not step or step <= 0:
            return None
        init = _operands(ins.call)
        start = 0
        tup = next((i for i in self.comps[caller] if init and i.name == init[0] and i.opcode == "tuple"), None)
        if tup is not None:
            init_elems = _operands(tup.call)
            if index < len(init_elems):
                value = self._constant(caller, init_elems[index])
                start = 0 if value is None else value
        span = {"LT": bound - start, "LE": bound - start + 1, "NE": bound - start}.get(direction.group(1))
        return None if span is None or span < 0 else -(-span // step)

    def _multiplicity(self) -> dict[str, float]:
        times: dict[str, float] = {}
        if self.entry is None:
            return times

        def visit(comp: str, n: float, depth: int):
            if comp not in self.comps or depth > 100:
                return
            times[comp] = times.get(comp, 0.0) + n
            for ins in self.comps[comp]:
                if ins.opcode == "while":
                    trips = self._trip_count(comp, ins)
                    if trips is None:
                        self.unknown_trip_counts += 1
                        trips = 1
                    body = re.search(r"body=%?([^\s,}]+)", ins.call)
                    if body:
                        visit(body.group(1), n * trips, depth + 1)
                    continue
                for attr in ("calls", "branch_computations", "async_computation"):
                    for m in re.finditer(attr + r"=(\{[^}]*\}|%?[^\s,}]+)", ins.call):
                        for callee in re.findall(r"%?([^\s,{}]+)", m.group(1)):
                            visit(callee, n, depth + 1)

        visit(self.entry, 1.0, 0)
        return times

    def instructions(self):
        """(instruction, executions) over every computation that runs."""
        for comp, instrs in self.comps.items():
            n = self.times.get(comp, 0.0)
            if n:
                for ins in instrs:
                    yield ins, n

    def collectives(self) -> dict[str, dict[str, float]]:
        """``{kind: {"count": executions, "bytes": operand bytes}}`` per module execution (per device)."""
        out: dict[str, dict[str, float]] = {}
        for ins, n in self.instructions():
            kind = ins.opcode[: -len("-start")] if ins.opcode.endswith("-start") else ins.opcode
            if kind not in COLLECTIVES:
                continue
            nbytes = sum(_type_bytes(self.types.get(o, "")) for o in _operands(ins.call))
            slot = out.setdefault(kind, {"count": 0.0, "bytes": 0.0})
            slot["count"] += n
            slot["bytes"] += n * nbytes
        return out

    def matmul_flops(self) -> float:
        """2 x multiply-adds of every ``dot`` and ``convolution``, times its executions."""
        total = 0.0
        for ins, n in self.instructions():
            if ins.opcode == "dot":
                total += n * self._dot_flops(ins)
            elif ins.opcode == "convolution":
                total += n * self._conv_flops(ins)
        return total

    def _dot_flops(self, ins: _Instr) -> float:
        out, ops = _arrays(ins.type_text), _operands(ins.call)
        lhs = _arrays(self.types.get(ops[0], "")) if ops else []
        cdims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.call)
        if not out or not lhs or not cdims:
            return 0.0
        k = math.prod(lhs[0][1][int(d)] for d in cdims.group(1).split(",") if d)
        return 2.0 * math.prod(out[0][1]) * k

    def _conv_flops(self, ins: _Instr) -> float:
        """Exact multiply-add count of an XLA convolution: per spatial dimension, the number of (output position,
        window tap) pairs that land on a real (unpadded, undilated) input element; TPU HLO expresses batched matmuls
        as convolutions whose "spatial" dimensions are such batch dimensions (window = size, padding = size - 1)."""
        out, ops = _arrays(ins.type_text), _operands(ins.call)
        labels = re.search(r"dim_labels=([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)", ins.call)
        if not out or len(ops) < 2 or not labels:
            return 0.0
        lhs, rhs = _arrays(self.types.get(ops[0], "")), _arrays(self.types.get(ops[1], ""))
        if not lhs or not rhs:
            return 0.0
        ll, rl, ol = labels.groups()
        lhs_dims, rhs_dims, out_dims = dict(zip(ll, lhs[0][1])), dict(zip(rl, rhs[0][1])), dict(zip(ol, out[0][1]))
        spatial = sorted(c for c in rl if c.isdigit())
        window = re.search(r"window=\{([^}]*)\}", ins.call)
        attrs = dict(re.findall(r"(\w+)=([\dx_]+)", window.group(1))) if window else {}

        def per_dim(name, default):
            if name not in attrs:
                return [default] * len(spatial)
            return attrs[name].split("x")

        sizes = [int(x) for x in per_dim("size", None)] if "size" in attrs else [rhs_dims[d] for d in spatial]
        pads = [tuple(int(v) for v in p.split("_")) for p in per_dim("pad", "0_0")]
        strides = [int(x) for x in per_dim("stride", 1)]
        lhs_dil = [int(x) for x in per_dim("lhs_dilate", 1)]
        rhs_dil = [int(x) for x in per_dim("rhs_dilate", 1)]
        pairs = 1
        for j, d in enumerate(spatial):
            pairs *= _window_pairs(lhs_dims[d], out_dims[d], sizes[j], pads[j][0], strides[j], lhs_dil[j], rhs_dil[j])
        other = math.prod(v for c, v in out_dims.items() if not c.isdigit())
        return 2.0 * other * rhs_dims.get("i", 1) * pairs


def _window_pairs(length: int, out_len: int, size: int, pad_lo: int, stride: int, lhs_dil: int, rhs_dil: int) -> int:
    """(output position, window tap) pairs of one convolution dimension that read a real input element.

    Tap ``k`` of output ``o`` reads position ``o * stride + k * rhs_dil - pad_lo`` of the (``lhs_dil``-dilated) input,
    which holds a real element where it lies in ``[0, (length - 1) * lhs_dil]`` and is a multiple of ``lhs_dil``.
    """
    last = (length - 1) * lhs_dil
    total = 0
    for k in range(size):
        first = k * rhs_dil - pad_lo
        o = np.arange(out_len, dtype=np.int64) * stride + first
        total += int(np.count_nonzero((o >= 0) & (o <= last) & (o % lhs_dil == 0)))
    return total


def collective_stats(hlo_text: str) -> dict[str, dict[str, float]]:
    """Bytes entering each kind of collective in one execution of the (per-device) compiled module.

    Counts every ``all-gather``/``reduce-scatter``/``all-reduce``/``all-to-all``/``collective-permute`` (and their
    async ``-start`` forms) by operand bytes, multiplied by how often its computation runs (scanned layers included).

    Returns: ``{kind: {"count": executions, "bytes": operand bytes}}``.
    """
    return HloModule(hlo_text).collectives()


# libtpu's out-of-memory messages, e.g. "Used 20.50G of 15.75G hbm. Exceeded hbm capacity by 4.75G." or "the total
# memory required for HLO temporaries (20.00G) exceeds available HBM (15.75G)".
_OOM_RES = (
    re.compile(r"Used\s+([\d.]+)([KMGT]?)i?B?\s+of\s+([\d.]+)([KMGT]?)i?B?\s+hbm", re.IGNORECASE),
    re.compile(r"required for [^(]*\(([\d.]+)([KMGT]?)i?B?\)\s+exceeds available HBM\s+\(([\d.]+)([KMGT]?)i?B?\)",
               re.IGNORECASE),
)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _oom_sizes(message: str) -> tuple[int, int] | None:
    """(bytes the program needs, bytes available) from libtpu's out-of-memory message, else None."""
    for pattern in _OOM_RES:
        m = pattern.search(message)
        if m:
            need, unit, avail, avail_unit = m.groups()
            return int(float(need) * _UNITS[unit.upper()]), int(float(avail) * _UNITS[avail_unit.upper()])
    return None


def compile_program(program: Program, mesh: Mesh, topology: Topology, rules,
                    dump_dir: str | None = None) -> tuple[Any, Report]:
    """Lowers and compiles ``program`` under ``mesh``; returns (compiled or None, report). ``dump_dir``: write the
    compiled HLO text there (``<program>.hlo.txt``)."""
    mesh_text = _mesh_text(dict(mesh.shape))
    t0 = time.perf_counter()
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            lowered = program.fn.lower(*program.args, **program.kwargs)
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - a compile failure is a verdict, not a crash
        msg = str(e)
        sizes = _oom_sizes(msg)
        report = Report(program.name, program.description, topology.name, mesh_text, topology.hbm_bytes,
                        time.perf_counter() - t0, fits=False, total=sizes and sizes[0],
                        available=sizes and sizes[1], error=msg)
        return None, report
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    arg, out, alias, temp = (int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes),
                             int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes))
    code = int(mem.generated_code_size_in_bytes)
    total = arg + out - alias + temp + code
    hlo_text = compiled.as_text()
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
        with open(os.path.join(dump_dir, f"{program.name}.hlo.txt"), "w") as f:
            f.write(hlo_text)
    hlo = HloModule(hlo_text)
    matmul = hlo.matmul_flops()
    report = Report(
        program.name, program.description, topology.name, mesh_text, topology.hbm_bytes, seconds,
        fits=total <= topology.hbm_bytes, argument=arg, output=out, alias=alias, temp=temp, code=code, total=total,
        flops=matmul + program.attention_flops, matmul_flops=matmul, attention_flops=program.attention_flops,
        collectives=hlo.collectives(), unknown_loops=hlo.unknown_trip_counts,
    )
    return compiled, report


def format_table(reports: Sequence[Report]) -> str:
    """Markdown table, one row per program (sizes and FLOPs per chip)."""
    head = ("| program | topology | mesh | argument | output | temp | total / chip | HBM / chip | verdict | "
            "TFLOP / chip | collectives (bytes in) | compile |")
    lines = [head, "|" + "---|" * 12]
    for r in reports:
        coll = ", ".join(f"{k} {_size(v['bytes'])}" for k, v in sorted(r.collectives.items())) or "none"
        flops = "-" if r.flops is None else f"{r.flops / 1e12:.3g}"
        lines.append(
            f"| {r.program} | {r.topology} | {r.mesh} | {_size(r.argument)} | {_size(r.output)} | {_size(r.temp)} | "
            f"{_size(r.total)} | {_size(r.hbm)} | {r.verdict} | {flops} | {coll} | {r.compile_seconds:.0f} s |"
        )
    return "\n".join(lines)


def run(config, topology: str, *, mesh: str | Mapping[str, int] | None = None, what: str = "all",
        batch: int | None = None, prompts: int = 1, precision: str | None = None,
        sample_precision: str = "infer", out: str | None = None, dump_dir: str | None = None) -> list[Report]:
    """Compiles the requested programs for ``topology``; returns their reports (and writes ``out`` if given)."""
    if what not in ("train", "sample", "all"):
        raise AotError(f"--what {what!r}: expected train, sample or all")
    topo = parse_topology(topology)
    devices = topology_devices(topo)
    cfg = _model_cfg(config)
    mesh_shape = parse_mesh(mesh) if isinstance(mesh, (str, type(None))) else dict(mesh)
    if mesh_shape is None:
        mesh_shape = dict(config.mesh.shape)
    the_mesh = build_mesh(devices, mesh_shape, cfg)
    rules = config_lib.mesh_rules(config)
    programs: list[Program] = []
    if what in ("train", "all"):
        programs += train_programs(config, the_mesh, batch=batch, precision=precision)
    if what in ("sample", "all"):
        programs += sample_programs(config, the_mesh, prompts=prompts, precision=sample_precision)
    reports, executables = [], {}
    for program in programs:
        log.info("compiling %s for %s (%s)", program.name, topo.name, program.description)
        compiled, report = compile_program(program, the_mesh, topo, rules, dump_dir)
        reports.append(report)
        if compiled is not None and out:
            executables[program.name] = serialize(compiled, report)
    if out:
        with open(out, "wb") as f:
            pickle.dump({"topology": topo.name, "mesh": _mesh_text(dict(the_mesh.shape)), "programs": executables}, f)
    return reports


def serialize(compiled, report: Report) -> dict:
    """A compiled program as bytes plus the pytree structure of its inputs/outputs (``load_executables``)."""
    from jax.experimental.serialize_executable import serialize as _serialize

    payload, in_tree, out_tree = _serialize(compiled)
    return {"executable": payload, "in_tree": in_tree, "out_tree": out_tree, "report": report.to_json()}


def load_executables(path: str, backend=None) -> dict[str, Callable]:
    """Loads the executables written by ``--out`` onto the current TPU backend: ``{program: callable}``."""
    from jax.experimental.serialize_executable import deserialize_and_load

    with open(path, "rb") as f:
        saved = pickle.load(f)
    return {name: deserialize_and_load(p["executable"], p["in_tree"], p["out_tree"], backend=backend)
            for name, p in saved["programs"].items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infstar_jax.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True,
                        help="config file, optionally :arg (configs/infinity_qwen8b.py:720p)")
    parser.add_argument("--topology", required=True, help="TPU topology (v5p:4x4x2) or slice name (v5p-64)")
    parser.add_argument("--mesh", default=None, help="mesh sizes, e.g. fsdp=16,tensor=4 (default: the config's)")
    parser.add_argument("--what", default="all", choices=("train", "sample", "all"))
    parser.add_argument("--batch", type=int, default=None,
                        help="global train rows (default: the config's train.batch_size)")
    parser.add_argument("--prompts", type=int, default=1, help="sampler prompts (2 rows each)")
    parser.add_argument("--precision", default=None, help="train precision mode (default: the config's)")
    parser.add_argument("--sample-precision", default="infer", help="sampler precision mode (default: infer)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--out", default=None, help="write the serialized executables to this file")
    parser.add_argument("--json", default=None, help="write the reports as JSON to this file")
    parser.add_argument("--dump-hlo", default=None, metavar="DIR", help="write each compiled program's HLO text here")
    args, rest = parser.parse_known_args(argv)
    # The train CLI's override form (--config.train.batch_size=64) is accepted too, so a launcher can forward it.
    overrides = list(args.set)
    for item in rest:
        if not item.startswith("--config.") or "=" not in item:
            parser.error(f"unrecognized argument {item!r}")
        overrides.append(item[len("--config."):])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = apply_overrides(with_training_sections(load_config(args.config)), overrides)
        reports = run(config, args.topology, mesh=args.mesh, what=args.what, batch=args.batch, prompts=args.prompts,
                      precision=args.precision, sample_precision=args.sample_precision, out=args.out,
                      dump_dir=args.dump_hlo)
    except AotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(reports))
    for r in reports:
        print(f"{r.program}: {r.description}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_json() for r in reports], f, indent=1)
    return 0 if all(r.fits for r in reports) else EXIT_DOES_NOT_FIT


if __name__ == "__main__":
    sys.exit(main())
