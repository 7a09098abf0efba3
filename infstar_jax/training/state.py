"""Train state, optimizer and learning-rate schedules (SPEC §7.5).

``TrainState`` is a flax struct (a pytree): ``step`` (int32 scalar), fp32 master ``params``, the optax
``opt_state`` and optional ``ema_params``. It is created already sharded (``create_sharded``): the abstract state is
traced with logical-axis boxes, turned into ``NamedSharding``s by the mesh rules, and ``init`` runs under ``jax.jit``
with those ``out_shardings``. Checkpoints store ``state_dict(state)`` (plain nested dicts, optax namedtuples turned
into dicts) and restore through ``from_state_dict`` onto whatever mesh is current.

The optimizer is the reference's: AdamW(b1 0.9, b2 0.97, eps 1e-8, weight decay 0), global-norm clipping at 5.0,
constant learning rate; a warm-up and cosine/linear decay are optional (``lr_schedule``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import serialization

from infstar_jax import parallel


@flax.struct.dataclass
class TrainState:
    """``step``: optimizer steps taken; ``params``: fp32 master weights; ``opt_state``: optax state;
    ``ema_params``: exponential moving average of ``params`` or ``None`` (EMA off)."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any = None


SCHEDULES = ("constant", "cosine", "linear")


def lr_schedule(lr: float, *, kind: str = "constant", warmup_steps: int = 0, total_steps: int | None = None,
                end_lr_ratio: float = 0.0) -> optax.Schedule:
    """Learning rate per optimizer step.

    ``constant`` (the release: 4e-5 from step 0), ``cosine`` or ``linear`` decay from ``lr`` to ``lr·end_lr_ratio``
    at ``total_steps``; each optionally preceded by a linear warm-up from 0 over ``warmup_steps``.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {kind!r}; choose one of {SCHEDULES}")
    if lr < 0 or warmup_steps < 0:
        raise ValueError(f"lr ({lr}) and warmup_steps ({warmup_steps}) must be >= 0")
    warmup_steps = int(warmup_steps)
    if kind == "constant":
        main = optax.constant_schedule(lr)
    else:
        if total_steps is None or total_steps <= warmup_steps:
            raise ValueError(f"a {kind} schedule needs total_steps ({total_steps}) > warmup_steps ({warmup_steps})")
        decay = int(total_steps) - warmup_steps
        if kind == "cosine":
            main = optax.cosine_decay_schedule(lr, decay, alpha=end_lr_ratio)
        else:
            main = optax.linear_schedule(lr, lr * end_lr_ratio, decay)
    if warmup_steps == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), main], [warmup_steps])


def decay_mask(params: Any) -> Any:
    """Weight decay applies to matrices only (kernels, the learned ``cfg_uncond``), not to norms and biases."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(schedule: optax.Schedule, *, b1: float = 0.9, b2: float = 0.97, eps: float = 1e-8,
                   weight_decay: float = 0.0, grad_clip: float = 5.0) -> optax.GradientTransformation:
    """Global-norm clipping (``grad_clip <= 0`` turns it off), then AdamW with ``schedule``."""
    parts = []
    if grad_clip and grad_clip > 0:
        parts.append(optax.clip_by_global_norm(grad_clip))
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=decay_mask if weight_decay else None))
    return optax.chain(*parts)


def optimizer_from_config(train: Mapping[str, Any]) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(optimizer, schedule)`` from a config's ``train`` section (keys as in ``tasks.default_config``)."""
    schedule = lr_schedule(float(train["lr"]), kind=train.get("lr_schedule", "constant"),
                           warmup_steps=int(train.get("warmup_steps", 0)), total_steps=int(train["steps"]),
                           end_lr_ratio=float(train.get("end_lr_ratio", 0.0)))
    tx = make_optimizer(schedule, b1=float(train.get("b1", 0.9)), b2=float(train.get("b2", 0.97)),
                        eps=float(train.get("eps", 1e-8)), weight_decay=float(train.get("weight_decay", 0.0)),
                        grad_clip=float(train.get("grad_clip", 5.0)))
    return tx, schedule


def init_state(params: Any, tx: optax.GradientTransformation, *, ema: bool = False) -> TrainState:
    """A fresh state around ``params`` (boxed or plain); the EMA starts equal to the params."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=jax.tree.map(lambda p: p, params) if ema else None)


def abstract_state(init_params_fn: Callable[[], Any], tx: optax.GradientTransformation, mesh,
                   rules=None, *, ema: bool = False) -> tuple[TrainState, TrainState]:
    """``(abstract, shardings)``: the state's ``ShapeDtypeStruct`` tree (carrying shardings) and its shardings.

    ``init_params_fn() -> boxed params`` (``nn.LogicallyPartitioned`` leaves). The optimizer moments inherit the
    params' logical axes (optax maps over the boxes); scalars (counts, step) are replicated.
    """
    boxed = jax.eval_shape(lambda: init_state(init_params_fn(), tx, ema=ema))
    shardings = parallel.param_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed),
                            shardings)
    return abstract, shardings


def create_sharded(init_params_fn: Callable[[], Any], tx: optax.GradientTransformation, mesh, rules=None, *,
                   ema: bool = False, params: Any = None) -> tuple[TrainState, TrainState]:
    """``(state, shardings)`` with every leaf born sharded.

    ``params``: already-placed params (e.g. a converted checkpoint restored onto the shardings); ``None`` runs the
    model's initializer (SPEC §1.12) under jit.
    """
    _, shardings = abstract_state(init_params_fn, tx, mesh, rules, ema=ema)
    if params is None:
        make = jax.jit(lambda: nn.unbox(init_state(init_params_fn(), tx, ema=ema)), out_shardings=shardings)
        return make(), shardings
    make = jax.jit(lambda p: init_state(p, tx, ema=ema), in_shardings=(shardings.params,), out_shardings=shardings)
    return make(params), shardings


def state_dict(state) -> dict:
    """Plain nested dicts of arrays (what the checkpoint stores) of any flax-struct state; an ``ema_params`` field
    that is ``None`` (EMA off) is left out."""
    d = serialization.to_state_dict(state)
    if "ema_params" in d and d["ema_params"] is None:
        del d["ema_params"]
    return d


def from_state_dict(template, d: Mapping[str, Any]):
    """Inverse of ``state_dict`` given a template state (or abstract state) of the same structure."""
    d = dict(d)
    if hasattr(template, "ema_params"):
        if template.ema_params is None:
            d["ema_params"] = None
        elif "ema_params" not in d:
            raise ValueError("the checkpoint has no EMA params but the run keeps an EMA (train.ema_decay > 0); "
                             "set train.ema_decay=0 or start a fresh run")
    return serialization.from_state_dict(template, d)
