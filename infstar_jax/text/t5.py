"""The T5 encoder (Flan-T5-XL in the release) in flax.linen, numerically matching transformers' ``T5EncoderModel``.

Architecture (pre-norm, no biases anywhere):

    x = embed(ids)                                   residual stream, always fp32
    bias = relative_position_bias(L)                 [H, L, L], computed once (T5's layer-0 table) and shared
    for each of num_layers layers (nn.scan):
        x = x + o(attention(q(n), k(n), v(n)) + bias + pad_mask)       n = rms_norm(x), logits NOT scaled by 1/sqrt(d)
        x = x + wo(act(wi_0(n)) * wi_1(n))   or   wo(act(wi(n)))       n = rms_norm(x)
    out = rms_norm(x)                                [B, L, D] fp32

Precision: ``dtype`` is the matmul dtype (fp32 or bf16). Norm statistics, attention logits/softmax and the residual
stream are fp32 in both modes; this mirrors what the release does at inference (fp16 weights under bf16 autocast,
where fp16 + bf16 residual additions promote to fp32) without its fp16 range problems.

Param tree (stacked layers carry a leading ``layers`` axis, the converter writes this layout):

    token_embedding          [V, D]            ("vocab", "embed")
    relative_attention_bias  [buckets, H]      (None, "heads")
    layers/attention_norm    [N, D]            ("layers", "embed")
    layers/{q,k,v}           [N, D, H, dkv]    ("layers", "embed", "heads", "head_dim")
    layers/o                 [N, H, dkv, D]    ("layers", "heads", "head_dim", "embed")
    layers/mlp_norm          [N, D]
    layers/{wi_0,wi_1}|wi    [N, D, F]         ("layers", "embed", "mlp")
    layers/wo                [N, F, D]         ("layers", "mlp", "embed")
    final_norm               [D]               ("embed",)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from infstar_jax import checkpoint
from infstar_jax.parallel import DEFAULT_RULES, constrain, logical_to_spec, param_shardings
from infstar_jax.text import prompts
from infstar_jax.text.tokenizer import DEFAULT_MAX_LENGTH, has_tokenizer, load_tokenizer

ACT_NAMES = ("activation_batch", "activation_length", "activation_embed")
HEAD_ACT_NAMES = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
MLP_ACT_NAMES = ("activation_batch", "activation_length", "activation_mlp")

# transformers' T5Config defaults; ``save_pretrained`` may omit keys that equal them.
HF_DEFAULTS = {
    "vocab_size": 32128,
    "d_model": 512,
    "d_kv": 64,
    "d_ff": 2048,
    "num_layers": 6,
    "num_heads": 8,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "relu",
}
# transformers' T5Config.attribute_map.
HF_ALIASES = {
    "hidden_size": "d_model",
    "num_attention_heads": "num_heads",
    "num_hidden_layers": "num_layers",
    "head_dim": "d_kv",
}


def _gelu_tanh(x):
    # transformers' "gelu_new" / "gelu_pytorch_tanh": the tanh approximation.
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture of a T5 encoder (the fields of transformers' ``T5Config`` that the encoder uses)."""

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dense_act_fn: str = "relu"
    is_gated_act: bool = False
    layer_norm_epsilon: float = 1e-6

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"T5Config.{name} must be a positive int, got {value!r}")
        if self.dense_act_fn not in ACTIVATIONS:
            raise ValueError(
                f"T5Config.dense_act_fn {self.dense_act_fn!r} is not supported; expected one of {sorted(ACTIVATIONS)}"
            )
        # Bidirectional bucketing halves the buckets, then half of those are exact offsets: at least one exact
        # bucket, and the log-spaced range must start below max_distance (else T5's formula divides by log(1) = 0).
        max_exact = self.relative_attention_num_buckets // 4
        if max_exact < 1 or self.relative_attention_max_distance <= max_exact:
            raise ValueError(
                f"T5Config: relative_attention_num_buckets={self.relative_attention_num_buckets} must be >= 4 and "
                f"relative_attention_max_distance={self.relative_attention_max_distance} must exceed num_buckets // 4"
            )

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "T5Config":
        """From a transformers ``config.json`` dict (missing keys take transformers' defaults)."""
        d = dict(HF_DEFAULTS)
        for k, v in hf.items():
            d[HF_ALIASES.get(k, k)] = v
        proj = str(d["feed_forward_proj"])
        parts = proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"feed_forward_proj {proj!r} is not 'ACT' or 'gated-ACT'")
        act = "gelu_new" if proj == "gated-gelu" else parts[-1]
        return cls(
            vocab_size=int(d["vocab_size"]),
            d_model=int(d["d_model"]),
            d_kv=int(d["d_kv"]),
            d_ff=int(d["d_ff"]),
            num_layers=int(d["num_layers"]),
            num_heads=int(d["num_heads"]),
            relative_attention_num_buckets=int(d["relative_attention_num_buckets"]),
            relative_attention_max_distance=int(d["relative_attention_max_distance"]),
            dense_act_fn=act,
            is_gated_act=parts[0] == "gated",
            layer_norm_epsilon=float(d["layer_norm_epsilon"]),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "T5Config":
        """Inverse of ``to_dict`` (the ``config`` stored in a converted checkpoint's infstar.json)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown T5Config fields {unknown}; expected a subset of {sorted(fields)}")
        return cls(**d)


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """T5's bidirectional relative-position bucket of every (query, key) pair.

    Returns ``[q_len, k_len] int32`` in ``[0, num_buckets)``. Computed on the host with the same fp32 operations in
    the same order as transformers (``log(n / max_exact) / log(max_distance / max_exact) * (half - max_exact)``,
    truncated): some distances land exactly on a bucket edge (16, 32, 64 for Flan-T5), where another rounding moves
    them to the neighbouring bucket; e.g. fp64 disagrees with transformers' fp32 for 40 of ~30k (buckets, distance)
    configs, such as 20 buckets / max distance 160 at distances 10, 20, 80.
    """
    rel = np.arange(k_len, dtype=np.int64)[None, :] - np.arange(q_len, dtype=np.int64)[:, None]
    half = num_buckets // 2
    max_exact = half // 2
    n = np.abs(rel)
    is_small = n < max_exact
    with np.errstate(divide="ignore"):
        scaled = np.log(np.maximum(n, 1).astype(np.float32) / np.float32(max_exact))
    scaled = scaled / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    large = np.minimum(max_exact + scaled.astype(np.int64), half - 1)
    buckets = (rel > 0).astype(np.int64) * half + np.where(is_small, n, large)
    return buckets.astype(np.int32)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """T5 LayerNorm: ``x / sqrt(mean(x^2) + eps) * scale``, no mean subtraction, no bias; fp32 in and out."""
    x = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(variance + eps) * scale.astype(jnp.float32)


def _param(module: nn.Module, name: str, shape, names, init, dtype):
    return module.param(name, nn.with_logical_partitioning(init, names), shape, dtype)


class T5Layer(nn.Module):
    """One encoder layer: pre-norm self-attention + pre-norm feed-forward, both residual. Scanned over layers."""

    config: T5Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, position_bias: jax.Array, mask_bias: jax.Array):
        """x: [B, L, D] fp32; position_bias: [H, L, L] fp32; mask_bias: [B, 1, 1, L] fp32 (0 or -inf-ish).

        Returns ``(x [B, L, D] fp32, None)`` (the scan carry and an empty per-layer output).
        """
        c = self.config
        d, h, dkv, f = c.d_model, c.num_heads, c.d_kv, c.d_ff
        ones = nn.initializers.ones
        dense_init = nn.initializers.lecun_normal()
        cast = lambda p: p.astype(self.dtype)  # noqa: E731
        einsum = lambda spec, a, b: jnp.einsum(spec, a, b, precision=self.precision)  # noqa: E731

        # Self-attention.
        norm = _param(self, "attention_norm", (d,), ("embed",), ones, self.param_dtype)
        n = rms_norm(x, norm, c.layer_norm_epsilon).astype(self.dtype)
        qkv_names = ("embed", "heads", "head_dim")
        q = einsum("bld,dhk->blhk", n, cast(_param(self, "q", (d, h, dkv), qkv_names, dense_init, self.param_dtype)))
        k = einsum("bld,dhk->blhk", n, cast(_param(self, "k", (d, h, dkv), qkv_names, dense_init, self.param_dtype)))
        v = einsum("bld,dhk->blhk", n, cast(_param(self, "v", (d, h, dkv), qkv_names, dense_init, self.param_dtype)))
        q, k, v = (constrain(t, HEAD_ACT_NAMES) for t in (q, k, v))
        # T5 folds the scale into its init: no 1/sqrt(dkv) here.
        logits = einsum("bqhk,bshk->bhqs", q, k).astype(jnp.float32) + position_bias[None] + mask_bias
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        attn = constrain(einsum("bhqs,bshk->bqhk", probs, v), HEAD_ACT_NAMES)
        o = _param(self, "o", (h, dkv, d), ("heads", "head_dim", "embed"), dense_init, self.param_dtype)
        x = x + einsum("blhk,hkd->bld", attn, cast(o)).astype(jnp.float32)
        x = constrain(x, ACT_NAMES)

        # Feed-forward.
        norm = _param(self, "mlp_norm", (d,), ("embed",), ones, self.param_dtype)
        n = rms_norm(x, norm, c.layer_norm_epsilon).astype(self.dtype)
        act = ACTIVATIONS[c.dense_act_fn]
        if c.is_gated_act:
            wi_0 = _param(self, "wi_0", (d, f), ("embed", "mlp"), dense_init, self.param_dtype)
            wi_1 = _param(self, "wi_1", (d, f), ("embed", "mlp"), dense_init, self.param_dtype)
            hidden = act(einsum("bld,df->blf", n, cast(wi_0))) * einsum("bld,df->blf", n, cast(wi_1))
        else:
            wi = _param(self, "wi", (d, f), ("embed", "mlp"), dense_init, self.param_dtype)
            hidden = act(einsum("bld,df->blf", n, cast(wi)))
        hidden = constrain(hidden, MLP_ACT_NAMES)
        wo = _param(self, "wo", (f, d), ("mlp", "embed"), dense_init, self.param_dtype)
        x = x + einsum("blf,fd->bld", hidden, cast(wo)).astype(jnp.float32)
        return constrain(x, ACT_NAMES), None


class T5Encoder(nn.Module):
    """The T5 encoder stack: ``(ids [B, L] int, mask [B, L] 0/1) -> last hidden state [B, L, D] fp32``."""

    config: T5Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        seq_len = ids.shape[1]
        embedding = _param(
            self, "token_embedding", (c.vocab_size, c.d_model), ("vocab", "embed"),
            nn.initializers.normal(1.0), self.param_dtype,
        )
        x = jnp.take(embedding, ids, axis=0).astype(jnp.float32)
        x = constrain(x, ACT_NAMES)

        table = _param(
            self, "relative_attention_bias", (c.relative_attention_num_buckets, c.num_heads), (None, "heads"),
            nn.initializers.normal(1.0), self.param_dtype,
        )
        buckets = relative_position_buckets(
            seq_len, seq_len, c.relative_attention_num_buckets, c.relative_attention_max_distance
        )
        position_bias = jnp.transpose(jnp.take(table, jnp.asarray(buckets), axis=0), (2, 0, 1)).astype(jnp.float32)
        # Padded keys get the most negative fp32, like transformers; padded queries still attend to real keys.
        mask_bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)

        stack = nn.scan(
            T5Layer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast),
            length=c.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = stack(c, self.dtype, self.param_dtype, self.precision, name="layers")(x, position_bias, mask_bias)
        final = _param(self, "final_norm", (c.d_model,), ("embed",), nn.initializers.ones, self.param_dtype)
        return constrain(rms_norm(x, final, c.layer_norm_epsilon), ACT_NAMES)


def abstract_params(config: T5Config, param_dtype: Any = jnp.float32) -> Any:
    """The boxed (``nn.LogicallyPartitioned``) param tree as ``ShapeDtypeStruct``s, without allocating anything."""
    model = T5Encoder(config, param_dtype=param_dtype)
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids))["params"]


def _fit_sharding(sharding: jax.sharding.NamedSharding, shape: tuple[int, ...]) -> jax.sharding.NamedSharding:
    """Drops mesh axes that do not divide their dimension (e.g. a head count not divisible by ``tensor``)."""
    mesh = sharding.mesh
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    fixed = []
    for dim, axes in zip(shape, spec):
        tup = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        size = int(np.prod([mesh.shape[a] for a in tup])) if tup else 1
        fixed.append(axes if dim % size == 0 else None)
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*fixed))


class TextEncoder:
    """A loaded T5 encoder (+ its tokenizer): prompts -> features, optionally sharded over a mesh.

    Attributes: ``config`` (T5Config), ``params`` (param tree, placed/sharded), ``tokenizer`` (or ``None`` when the
    checkpoint directory has no tokenizer files), ``mesh``, ``dtype``, ``buckets``.
    """

    def __init__(self, config: T5Config, params: Any, tokenizer, *, dtype=jnp.float32, precision=None, mesh=None,
                 rules=None, buckets: tuple[int, ...] = ()):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.mesh = mesh
        self.rules = tuple(rules) if rules is not None else DEFAULT_RULES
        self.buckets = tuple(buckets)
        self.model = T5Encoder(config, dtype=dtype, param_dtype=jax.tree.leaves(params)[0].dtype, precision=precision)

        def forward(params, ids, mask):
            with nn.logical_axis_rules(self.rules):
                return self.model.apply({"params": params}, ids, mask)

        def forward_masked(params, ids, mask):
            return forward(params, ids, mask) * (mask[..., None] > 0)

        self._forward = jax.jit(forward)
        self._forward_masked = jax.jit(forward_masked)

    def _batch_sharding(self, shape: tuple[int, ...]):
        spec = logical_to_spec(("activation_batch",) + (None,) * (len(shape) - 1), self.rules)
        return _fit_sharding(jax.sharding.NamedSharding(self.mesh, spec), shape)

    def _run(self, fn, ids, mask):
        ids = np.asarray(ids, np.int32)
        mask = np.asarray(mask, np.int32)
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ValueError(f"ids and mask must both be [B, L]; got {ids.shape} and {mask.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}); got [{ids.min()}, {ids.max()}]")
        if self.mesh is None:
            return fn(self.params, ids, mask)
        sharding = self._batch_sharding(ids.shape)
        with jax.set_mesh(self.mesh):
            return fn(self.params, jax.device_put(ids, sharding), jax.device_put(mask, sharding))

    def encode_ids(self, ids, mask) -> jax.Array:
        """``ids [B, L] int32``, ``mask [B, L]`` (1 = token, 0 = pad) -> last hidden state ``[B, L, D] float32``.

        Identical to transformers' ``T5EncoderModel(...).last_hidden_state`` including the rows at padded positions.
        """
        return self._run(self._forward, ids, mask)

    def batch_multiple(self) -> int:
        """Batch sizes are padded to a multiple of this (the number of devices the batch is split over)."""
        if self.mesh is None:
            return 1
        spec = self._batch_sharding((self.mesh.size, 1)).spec[0]
        axes = () if spec is None else ((spec,) if isinstance(spec, str) else tuple(spec))
        return int(np.prod([self.mesh.shape[a] for a in axes])) if axes else 1

    def encode(self, prompts: list[str]) -> tuple[jax.Array, np.ndarray]:
        """Tokenises (``</s>`` appended, truncated at ``tokenizer.max_length``), pads to a bucket and encodes.

        The strings are encoded as given: build them with ``prompts.inference_prompt`` / ``training_caption``.
        Returns ``features [B, Lb, D] float32`` with rows ``>= lengths[b]`` set to 0, and ``lengths [B] int32``
        (tokens incl. EOS = the rows the release keeps).
        """
        if self.tokenizer is None:
            raise ValueError(
                "this text encoder has no tokenizer (the converted directory holds neither tokenizer.json nor "
                "spiece.model); copy them from the Hugging Face folder or use encode_ids"
            )
        if isinstance(prompts, str) or not prompts:
            raise ValueError("encode expects a non-empty list of strings")
        buckets = self.buckets or (self.tokenizer.max_length,)
        ids, mask = self.tokenizer(prompts, buckets=buckets)
        lengths = mask.sum(axis=1).astype(np.int32)
        b = ids.shape[0]
        pad_rows = -b % self.batch_multiple()
        if pad_rows:
            # Filler rows hold one EOS so that no row is fully masked; they are dropped below.
            filler = np.zeros((pad_rows, ids.shape[1]), np.int32)
            filler_mask = filler.copy()
            filler[:, 0], filler_mask[:, 0] = self.tokenizer.eos_id, 1
            ids, mask = np.concatenate([ids, filler]), np.concatenate([mask, filler_mask])
        features = self._run(self._forward_masked, ids, mask)
        return (features[:b] if pad_rows else features), lengths


def load_text_encoder(
    converted_dir,
    dtype: Any = jnp.float32,
    mesh=None,
    *,
    param_dtype: Any = None,
    precision: Any = None,
    rules=None,
    buckets: tuple[int, ...] | None = None,
    max_length: int | None = None,
) -> TextEncoder:
    """Loads a directory written by ``python -m infstar_jax.convert t5``.

    Args:
      converted_dir: the converted checkpoint (infstar.json with kind "t5", params/, tokenizer files).
      dtype: matmul dtype, ``jnp.float32`` or ``jnp.bfloat16``.
      mesh: a mesh from ``infstar_jax.parallel.make_mesh``; params are restored sharded by the logical rules and a
        batch of prompts is split over the batch axes. ``None``: one device.
      param_dtype: storage dtype of the restored params (default ``dtype``).
      precision: matmul precision; default ``"highest"`` for fp32 (so fp32 means fp32 on GPUs/TPUs too) and the
        backend default for bf16.
      rules: logical axis rules (default ``parallel.DEFAULT_RULES``).
      buckets: padded lengths for ``encode`` (default ``prompts.DEFAULT_BUCKETS`` up to ``max_length``).
      max_length: tokenizer truncation length incl. EOS (default from tokenizer_config.json, else 512).
    """
    meta = checkpoint.read_meta(converted_dir)
    if meta.get("kind") != "t5":
        raise ValueError(f"{converted_dir} holds a {meta.get('kind')!r} checkpoint, expected 't5'")
    config = T5Config.from_dict(meta["config"])
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
    param_dtype = dtype if param_dtype is None else jnp.dtype(param_dtype)
    if precision is None and dtype == jnp.dtype(jnp.float32):
        precision = "highest"
    rules = tuple(rules) if rules is not None else DEFAULT_RULES

    boxed = abstract_params(config, param_dtype)
    unboxed = nn.meta.unbox(boxed)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), unboxed)
    else:
        shardings = param_shardings(boxed, mesh, rules)
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=_fit_sharding(s, a.shape)), unboxed, shardings
        )
    params = checkpoint.load_params(converted_dir, target, kind="t5")

    tokenizer = load_tokenizer(converted_dir, max_length=max_length) if has_tokenizer(converted_dir) else None
    limit = tokenizer.max_length if tokenizer is not None else (max_length or DEFAULT_MAX_LENGTH)
    if buckets is None:
        buckets = tuple(b for b in prompts.DEFAULT_BUCKETS if b < limit) + (limit,)
    return TextEncoder(config, params, tokenizer, dtype=dtype, precision=precision, mesh=mesh, rules=rules,
                       buckets=tuple(buckets))
