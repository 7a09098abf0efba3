"""The transformer's train step: pure, jitted per step shape, with donated state (SPEC §5, §7.2-§7.6).

One call = one optimizer step on one global batch (``batching.py`` builds it):

1. **Tokenise with self-correction** (no gradient): every row's latent goes through the multi-scale residual BSQ of
   its schedule (``multiscale.encode_self_correct``): at each (scale, repetition) step the bits of the residual are
   the **label**, then each bit flips with the row's drawn probability for that step, and the **flipped** codes are
   accumulated, so later inputs carry the injected errors while later labels correct them.
2. **Select** one repetition per kept scale (``repeat_idx``): its input (down-sampled accumulator) and label.
3. **Forward/backward** of the packed rows (block-sparse attention, text dropout through ``uncond_rows``), bitwise
   loss per token, mean per scale, per-scale weights (SPEC §7.6) -> one loss per row; the batch loss is the mean over
   real rows (placeholder rows have ``row_weight`` 0). With ``grad_accum = A`` the rows are split into A
   micro-batches (row ``i`` goes to micro-batch ``i mod A``) whose gradients are summed in a ``lax.scan``.
4. **Update**: global-norm clipping and AdamW (``state.make_optimizer``), optional EMA.

The flips are random bits drawn from ``fold_in(key(seed), state.step)`` split per row: a resumed run draws the same
flips, and with threefry's partitionable mode the draw does not depend on the mesh.

Batch arrays (global rows ``B``, sharded over the batch mesh axes): ``latent [B, T, H, W, C] f32``,
``text [B, S, D] f32``, ``uncond_rows [B, S] i32``, ``key_valid [B, L] bool``, ``positions [B, L, 4] i32``,
``repeat_idx [B, K] i32``, ``flip_probs [B, steps] f32``, ``row_weight [B] f32`` (``text_len`` is host-only).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from infstar_jax import parallel
from infstar_jax.tokenizer import multiscale
from infstar_jax.training.batching import StepShape
from infstar_jax.training.state import TrainState
from infstar_jax.transformer import loss as loss_lib
from infstar_jax.transformer.config import REMAT_POLICIES, TransformerConfig
from infstar_jax.transformer.model import Transformer

DEVICE_KEYS = ("latent", "text", "uncond_rows", "key_valid", "positions", "repeat_idx", "flip_probs", "row_weight")


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """``seed``: flip randomness; ``grad_accum``: micro-batches per step; ``ema_decay``: 0 = no EMA."""

    seed: int = 0
    grad_accum: int = 1
    ema_decay: float = 0.0


def encode_rows(latent: jax.Array, flip_probs: jax.Array, keys: jax.Array, plan: multiscale.Plan
                ) -> multiscale.EncodeResult:
    """Per-row self-corrected tokenisation.

    latent ``[B, T, H, W, C]``, flip_probs ``[B, steps]``, keys ``[B]`` -> ``EncodeResult`` with a leading ``B``
    (each row drew its own flips from its own key).
    """
    def one(lat, p, k):
        res = multiscale.encode_self_correct(lat[None], plan, k, p)
        return jax.tree.map(lambda x: x[0], res._replace(intermediates=None))

    return jax.vmap(one)(latent, flip_probs, keys)


def select_kept(enc: multiscale.EncodeResult, shape: StepShape, repeat_idx: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
    """Inputs and labels of the kept repetitions, packed in kept-scale order.

    Returns ``visual [B, Lv, C] f32`` (input features) and ``labels [B, Lv, detail_bits] uint8`` (semantic scales'
    16 bits padded with zeros: only their first 16 are read by the loss).
    """
    plan = shape.plan
    xs, ls = [], []
    for k, si in enumerate(shape.kept):
        steps = [plan.step_index(si, r) for r in range(plan.reps[si])]
        x = jnp.stack([enc.x_in[s] for s in steps], axis=1)  # [B, R, pt, ph, pw, C]
        b = jnp.stack([enc.bits[s] for s in steps], axis=1)  # [B, R, pt, ph, pw, d]
        idx = repeat_idx[:, k].reshape((-1,) + (1,) * (x.ndim - 1))
        x = jnp.take_along_axis(x, idx, axis=1)[:, 0]
        b = jnp.take_along_axis(b, idx, axis=1)[:, 0]
        rows = x.shape[0]
        xs.append(x.reshape(rows, -1, x.shape[-1]))
        b = b.reshape(rows, -1, b.shape[-1])
        ls.append(jnp.pad(b, ((0, 0), (0, 0), (0, shape.detail_bits - b.shape[-1]))))
    return jnp.concatenate(xs, axis=1), jnp.concatenate(ls, axis=1)


def row_losses(params, model: Transformer, shape: StepShape, visual, labels, batch: Mapping[str, jax.Array]):
    """Packed forward and the per-row scale-weighted loss.

    Returns ``(row_loss [B], row_acc [B], block_loss [B, nb], block_acc [B, nb])``.
    """
    pk = shape.packing
    detail, semantic = model.apply({"params": params}, visual, batch["text"], batch["positions"], pk.layout,
                                   uncond_rows=batch["uncond_rows"], key_valid=batch["key_valid"])
    tl, ta = loss_lib.token_loss_acc(detail, semantic, labels, jnp.asarray(pk.token_is_detail()))
    blocks, weights = jnp.asarray(pk.token_block()), jnp.asarray(pk.block_weights())
    row_loss, block_loss = loss_lib.scale_weighted(tl, blocks, weights)
    row_acc, block_acc = loss_lib.scale_weighted(ta, blocks, weights)
    return row_loss, row_acc, block_loss, block_acc


def _micro_batches(tree, a: int):
    """Leading axis ``B`` -> ``[A, B/A, ...]`` with row ``i`` in micro-batch ``i mod A`` (each micro-batch keeps
    rows from every data shard)."""
    def split(x):
        y = x.reshape((x.shape[0] // a, a) + x.shape[1:])
        return jnp.swapaxes(y, 0, 1)

    return jax.tree.map(split, tree)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, shape: StepShape, model: Transformer,
               tx: optax.GradientTransformation, schedule: optax.Schedule, options: StepOptions,
               rules=None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step (pure; jit it with ``shape``, ``model``, ``tx`` bound). Returns the new state and metrics:
    ``loss``, ``acc`` (row means of the scale-weighted values), ``block_loss [nb]``, ``block_acc [nb]`` (per kept
    scale, row means), ``grad_norm`` (before clipping), ``lr``, ``rows`` (real rows)."""
    with nn.logical_axis_rules(rules or parallel.DEFAULT_RULES):
        rows = batch["latent"].shape[0]
        keys = jax.random.split(jax.random.fold_in(jax.random.key(options.seed), state.step), rows)
        enc = encode_rows(batch["latent"], batch["flip_probs"], keys, shape.plan)
        visual, labels = select_kept(enc, shape, batch["repeat_idx"])
        inputs = {k: batch[k] for k in ("text", "uncond_rows", "key_valid", "positions")}
        inputs.update(visual=visual, labels=labels, row_weight=batch["row_weight"])

        def loss_sum(params, mb):
            rl, ra, bl, ba = row_losses(params, model, shape, mb["visual"], mb["labels"], mb)
            w = mb["row_weight"]
            sums = dict(loss=jnp.sum(w * rl), acc=jnp.sum(w * ra), block_loss=w @ bl, block_acc=w @ ba)
            return sums["loss"], sums

        grad_fn = jax.grad(loss_sum, has_aux=True)
        a = options.grad_accum
        if a == 1:
            grads, sums = grad_fn(state.params, inputs)
        else:
            if rows % a:
                raise ValueError(f"{rows} rows cannot be split into grad_accum={a} micro-batches")

            def body(carry, mb):
                g, s = grad_fn(state.params, mb)
                return jax.tree.map(jnp.add, carry, (g, s)), None

            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, state.params,
                                                                jax.tree.map(lambda x: x[: rows // a], inputs)))
            (grads, sums), _ = jax.lax.scan(body, zeros, _micro_batches(inputs, a))
        weight = jnp.sum(batch["row_weight"])
        denom = jnp.maximum(weight, 1e-6)
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            d = options.ema_decay
            ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
        metrics = {k: v / denom for k, v in sums.items()}
        metrics.update(grad_norm=grad_norm, lr=jnp.asarray(schedule(state.step), jnp.float32), rows=weight)
        return TrainState(state.step + 1, params, opt_state, ema), metrics


def parse_remat_by_length(text: str) -> tuple[tuple[int, str], ...]:
    """``"20000:none,32000:dots"`` -> ``((20000, "none"), (32000, "dots"))`` (bounds increasing; ``""`` = none)."""
    out = []
    for part in filter(None, (p.strip() for p in str(text or "").split(","))):
        bound, sep, policy = part.partition(":")
        if not sep or not bound.strip().isdigit() or policy.strip() not in REMAT_POLICIES:
            raise ValueError(f"remat_by_length {text!r}: expected MAX_TOKENS:POLICY pairs separated by commas, policy "
                             f"one of {', '.join(REMAT_POLICIES)}; got {part!r}")
        out.append((int(bound), policy.strip()))
    if any(a[0] >= b[0] for a, b in zip(out, out[1:])):
        raise ValueError(f"remat_by_length {text!r}: the token bounds must increase")
    return tuple(out)


class TrainStep:
    """``step(state, shape, batch) -> (state, metrics)``: one ``jax.jit`` per distinct ``StepShape`` (cached),
    state donated, params/optimizer state kept on ``state_shardings``, batch rows over the batch mesh axes.

    ``remat_by_length`` (``parse_remat_by_length``) picks the remat policy per packed length: the first pair whose
    bound is >= the step's length applies, longer steps use ``model_cfg.remat``. Short packed sequences leave memory
    unused, and recomputing their forward pass costs a third of the step.
    """

    def __init__(self, model_cfg: TransformerConfig, tx: optax.GradientTransformation, schedule: optax.Schedule,
                 options: StepOptions, mesh, state_shardings, rules=None,
                 remat_by_length: tuple[tuple[int, str], ...] = ()):
        self.model = Transformer(model_cfg)
        self.remat_by_length = tuple((int(n), Transformer(model_cfg.replace(remat=p))) for n, p in remat_by_length)
        self.tx, self.schedule, self.options = tx, schedule, options
        self.mesh, self.state_shardings = mesh, state_shardings
        self.rules = tuple(rules or parallel.DEFAULT_RULES)
        self.batch_sharding = NamedSharding(mesh, parallel.logical_to_spec(("activation_batch",), self.rules))
        self._compiled: dict[StepShape, Any] = {}

    def model_for(self, length: int) -> Transformer:
        """The model (remat policy) used for packed sequences of ``length`` tokens."""
        for bound, model in self.remat_by_length:
            if length <= bound:
                return model
        return self.model

    @property
    def num_compiled(self) -> int:
        return len(self._compiled)

    def function(self, shape: StepShape):
        fn = self._compiled.get(shape)
        if fn is None:
            f = functools.partial(train_step, shape=shape, model=self.model_for(shape.length), tx=self.tx, schedule=self.schedule,
                                  options=self.options, rules=self.rules)
            replicated = NamedSharding(self.mesh, P())
            fn = jax.jit(f, in_shardings=(self.state_shardings, self.batch_sharding),
                         out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
            self._compiled[shape] = fn
        return fn

    def __call__(self, state: TrainState, shape: StepShape, batch: Mapping[str, jax.Array]):
        return self.function(shape)(state, {k: batch[k] for k in DEVICE_KEYS})


def device_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays of a host batch that go to the devices."""
    return {k: arrays[k] for k in DEVICE_KEYS}
