"""One mesh, logical axis rules, and the activation-constraint helper.

Every parameter in infstar-jax carries logical axis names (``embed``, ``heads``, ``mlp`` ...). A list of rules maps
each logical name to zero, one or several mesh axes; the rules live in config (``config.mesh.rules``) and default to
``DEFAULT_RULES``. The mesh always has the four axes ``("data", "fsdp", "context", "tensor")``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "context", "tensor")

# Logical name -> mesh axes. Parameters are sharded FSDP-style over `fsdp` on their `embed` dimension and
# Megatron-style over `tensor` on heads / MLP width; activations are split over (data, fsdp) on the batch and over
# `context` on the sequence.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", "context"),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_head_dim", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("vocab", None),
    ("bits", None),
    ("text_embed", None),
    ("text_length", None),
    # Video tokenizer: batch over data axes, spatial rows over `context`; conv channels replicated.
    ("frames", None),
    ("height", "context"),
    ("width", None),
    ("conv_in", None),
    ("conv_out", None),
)


def make_mesh(shape: Mapping[str, int] | Sequence[int] | None = None, devices: Sequence[Any] | None = None):
    """Builds the 4-axis mesh.

    Args:
      shape: sizes of ``("data", "fsdp", "context", "tensor")`` as a mapping (missing axes = 1) or a sequence;
        at most one size may be -1 (= all remaining devices). ``None`` puts every device on ``fsdp``.
      devices: devices to use (default: all).
    Returns:
      a ``jax.sharding.Mesh`` with ``AxisType.Auto`` axes.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if shape is None:
        sizes = [1, -1, 1, 1]
    elif isinstance(shape, Mapping):
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
        sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    else:
        sizes = [int(s) for s in shape]
        if len(sizes) != len(MESH_AXES):
            raise ValueError(f"mesh shape {tuple(sizes)} must give 4 sizes for {MESH_AXES}")
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if known == 0 or n % known:
            raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))} does not divide {n} devices")
        sizes[sizes.index(-1)] = n // known
    if int(np.prod(sizes)) != n:
        raise ValueError(
            f"mesh shape {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, have {n}; "
            "use -1 for one axis to fill the rest"
        )
    try:
        return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
    except NotImplementedError:
        # Some TPU slice shapes (e.g. v6e 8x8 as fsdp=16 x tensor=4) need logical axes that split physical ones.
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(tuple(sizes), devices=devices, allow_split_physical_axes=True)
        return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(names: Sequence[str | None], rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> P:
    """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once (later dims replicate)."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in names:
        axes = table.get(name) if name is not None else None
        if axes is None:
            out.append(None)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*out)


def param_shardings(abstract_params: Any, mesh, rules: Sequence[tuple[str, Any]] | None = None) -> Any:
    """NamedShardings for a (possibly abstract) param tree whose leaves carry ``nn.LogicallyPartitioned`` boxes."""
    rules = rules if rules is not None else (tuple(nn.get_logical_axis_rules()) or DEFAULT_RULES)
    specs = nn.get_partition_spec(abstract_params)
    return jax.tree.map(
        lambda s: NamedSharding(mesh, logical_to_spec(tuple(s), rules)),
        specs,
        is_leaf=lambda x: isinstance(x, P),
    )


def constrain(x: jax.Array, names: Sequence[str | None], rules: Sequence[tuple[str, Any]] | None = None) -> jax.Array:
    """Sharding constraint by logical names under the current ``jax.set_mesh``; a no-op without a mesh.

    Rules: ``rules`` if given, else those of an enclosing ``nn.logical_axis_rules(...)``, else ``DEFAULT_RULES``.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    rules = rules if rules is not None else (tuple(nn.get_logical_axis_rules()) or DEFAULT_RULES)
    return jax.lax.with_sharding_constraint(x, fitted_spec(x.shape, names, mesh, rules))


def fitted_spec(shape: Sequence[int], names: Sequence[str | None], mesh,
                rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> P:
    """PartitionSpec of logical ``names`` for an array of ``shape``, dropping the mesh axes that do not divide their
    dimension (tiny test shapes, odd sequence lengths, small latents)."""
    spec = logical_to_spec(names, rules)
    fixed = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            fixed.append(None)
            continue
        tup = (axes,) if isinstance(axes, str) else tuple(axes)
        size = int(np.prod([mesh.shape[a] for a in tup]))
        fixed.append(axes if dim % size == 0 else None)
    return P(*fixed)


def init_sharded(init_fn, *args, mesh, rules: Sequence[tuple[str, Any]] | None = None):
    """Runs ``init_fn(*args)`` (returning a boxed param tree) so that params are born sharded.

    Returns ``(params, shardings)``: an unboxed tree of arrays laid out by the logical rules, and its shardings.
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = param_shardings(abstract, mesh, rules)
    params = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return params, shardings


def abstract_sharded(abstract_boxed: Any, mesh, rules: Sequence[tuple[str, Any]] | None = None) -> Any:
    """``jax.ShapeDtypeStruct`` tree with shardings (restore targets): params are read straight into place."""
    shardings = param_shardings(abstract_boxed, mesh, rules)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(abstract_boxed), shardings
    )
