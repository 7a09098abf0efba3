"""The InfinityStar spacetime transformer in flax.linen (SPEC §1).

Qwen3-style pre-norm blocks (GQA, qk-RMSNorm before 4-D RoPE, SwiGLU, no biases unless ``qkvo_bias``), stacked with
``nn.scan`` (params carry a leading ``layers`` axis). Text features enter as prefix tokens through ``text_proj``;
visual tokens through ``word_embed`` of 64-d latent features. Two fp32 bitwise heads: ``head`` (detail, 2·64 logits)
and ``semantic_head2`` (semantic, 2·16), logits laid out ``[..., bit, label]``.

Entry points (all pure, ``model.apply(params, ..., method=...)``):
  * ``__call__`` — a packed training sequence with a static ``BlockLayout`` (block-sparse attention);
  * ``text_step`` / ``visual_step`` — the sampler's steps with an explicit per-layer KV prefix (SPEC §1.10).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from infstar_jax.parallel import constrain
from infstar_jax.transformer import rope
from infstar_jax.transformer.attention import BlockLayout, block_sparse_attention, prefix_attention
from infstar_jax.transformer.config import TransformerConfig

F32 = jnp.float32
BATCH_LEN_EMBED = ("activation_batch", "activation_length", "activation_embed")


def _init_normal(std: float = 0.02):
    return nn.initializers.normal(std)


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * w`` with fp32 statistics and product; returns the input dtype (SPEC §1.2).

    ``separate_stats``: compute the per-row statistic as its own (small) result, so that the compiler fuses the
    normalisation into what consumes it instead of the reduction (the q/k norms, whose consumer is RoPE: on an H200 at
    the 720p last scale q's norm and RoPE take 1.07 ms this way and 1.96 ms as one reduction fusion plus one
    element-wise pass, ``benchmarks/bench_layer.py``; the values are the same).
    """

    eps: float = 1e-6
    param_dtype: Any = F32
    axis_name: str = "embed"
    separate_stats: bool = False

    @nn.compact
    def __call__(self, x):
        w = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)), (x.shape[-1],), self.param_dtype
        )
        x32 = x.astype(F32)
        r = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.separate_stats:
            r = jax.lax.optimization_barrier(r)
        return (x32 * r * w.astype(F32)).astype(x.dtype)


class Linear(nn.Module):
    """Dense layer over the last ``len(in_shape)`` axes with explicit compute dtype.

    Inputs and kernel are cast to ``dtype`` (as autocast does), accumulated in fp32, output in ``dtype``.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    dtype: Any = F32
    param_dtype: Any = F32
    use_bias: bool = False
    kernel_init: Any = _init_normal()

    @nn.compact
    def __call__(self, x):
        n_in = len(self.in_shape)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, self.axes),
            self.in_shape + self.out_shape,
            self.param_dtype,
        )
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        # bf16 x bf16 -> bf16 still accumulates in fp32 on GPU/TPU; asking for the bf16 result directly lets the
        # GEMM write it (no fp32 intermediate of the whole activation in HBM).
        y = jax.lax.dot_general(
            x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())), preferred_element_type=self.dtype
        )
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, self.axes[n_in:]),
                self.out_shape,
                self.param_dtype,
            )
            y = (y.astype(F32) + bias.astype(F32)).astype(self.dtype)
        return y


# The attention submodule that ``fuse_qkv`` puts in place of ``q_proj``/``k_proj``/``v_proj``.
FUSED_QKV = "qkv_proj"


def fuse_qkv(layer_params: dict, *, donate: bool = False) -> dict:
    """One block's params with ``attn``'s ``q_proj``/``k_proj``/``v_proj`` replaced by one ``Linear`` whose kernel
    ``[C, H + 2 Hkv, hd]`` (and bias) joins theirs along the head axis; ``Attention`` then runs the three projections
    as one matmul (H200, 720p last scale: 8.9 ms against 6.5-7.6 + 2 x 1.7-2.0 ms, docs/benchmarks.md). For inference
    on weights that are not split over heads (the join mixes the three head axes). ``donate`` deletes the three
    separate kernels once joined."""
    attn = dict(layer_params["attn"])
    parts = [attn.pop(name) for name in ("q_proj", "k_proj", "v_proj")]
    attn[FUSED_QKV] = {key: jnp.concatenate([p[key] for p in parts], axis=-2) for key in parts[0]}
    if donate:
        for leaf in jax.tree.leaves(parts):
            if isinstance(leaf, jax.Array):
                leaf.delete()
    return {**layer_params, "attn": attn}


class Attention(nn.Module):
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x, cos, sin, layout: BlockLayout | None, key_valid, prefix_k, prefix_v, prefix_valid):
        cfg = self.cfg
        c, h, kv, hd = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dt, pdt = cfg.jnp_dtype, cfg.jnp_block_param_dtype
        lin = dict(dtype=dt, param_dtype=pdt, use_bias=cfg.qkvo_bias)
        if FUSED_QKV in self.variables.get("params", {}):
            # The sampler's layout (``fuse_qkv``): the three projections as one matmul over joined kernels.
            qkv = Linear((c,), (h + 2 * kv, hd), ("embed", None, "head_dim"), name=FUSED_QKV, **lin)(x)
            q, k, v = jnp.split(qkv, [h, h + kv], axis=-2)
        else:
            q = Linear((c,), (h, hd), ("embed", "heads", "head_dim"), name="q_proj", **lin)(x)
            k = Linear((c,), (kv, hd), ("embed", "kv_heads", "head_dim"), name="k_proj", **lin)(x)
            v = Linear((c,), (kv, hd), ("embed", "kv_heads", "head_dim"), name="v_proj", **lin)(x)
        q = RMSNorm(cfg.norm_eps, pdt, "head_dim", separate_stats=True, name="q_norm")(q)
        k = RMSNorm(cfg.norm_eps, pdt, "head_dim", separate_stats=True, name="k_norm")(k)
        self.sow("intermediates", "q_prerope", q)
        self.sow("intermediates", "k_prerope", k)
        q = rope.apply(q, cos, sin)
        k = rope.apply(k, cos, sin)
        self.sow("intermediates", "q_rope", q)
        self.sow("intermediates", "k_rope", k)
        self.sow("intermediates", "v", v)
        q = constrain(q, ("activation_batch", "activation_length", "activation_heads", "activation_head_dim"))
        k = constrain(k, ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim"))
        v = constrain(v, ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim"))
        if prefix_k is None:
            o = block_sparse_attention(q, k, v, layout, key_valid=key_valid)
        else:
            # Sampling: the current tokens, then the cached prefix (referenced scales, text last).
            o = prefix_attention(q, k, v, prefix_k, prefix_v, prefix_valid, maskable_tail=cfg.text_maxlen)
        self.sow("intermediates", "attn_out", o.reshape(*o.shape[:2], h * hd))
        out = Linear((h, hd), (c,), ("heads", "head_dim", "embed"), name="o_proj", **lin)(o)
        return out, (k, v)


class MLP(nn.Module):
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        lin = dict(dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_block_param_dtype)
        c, m = cfg.embed_dim, cfg.mlp_dim
        gate = Linear((c,), (m,), ("embed", "mlp"), name="gate_proj", **lin)(x)
        up = Linear((c,), (m,), ("embed", "mlp"), name="up_proj", **lin)(x)
        hidden = constrain(nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp"))
        return Linear((m,), (c,), ("mlp", "embed"), name="down_proj", **lin)(hidden)


class Block(nn.Module):
    """Pre-norm residual block; scanned over layers (carry = residual stream)."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, h, cos, sin, layout, key_valid, prefix):
        cfg = self.cfg
        pdt = cfg.jnp_block_param_dtype
        prefix_k, prefix_v, prefix_valid = (None, None, None) if prefix is None else prefix
        x = RMSNorm(cfg.norm_eps, pdt, name="input_layernorm")(h)
        a, kv = Attention(cfg, name="attn")(x, cos, sin, layout, key_valid, prefix_k, prefix_v, prefix_valid)
        h = h + a.astype(h.dtype)
        x = RMSNorm(cfg.norm_eps, pdt, name="post_attention_layernorm")(h)
        h = h + MLP(cfg, name="mlp")(x).astype(h.dtype)
        h = constrain(h, BATCH_LEN_EMBED)
        self.sow("intermediates", "block_out", h)
        return h, kv


# Primitives whose outputs are the attention kernels' forward results (output and softmax statistics): cuDNN's fused
# attention on GPU, the Pallas splash kernel on TPU. The XLA attention (CPU) is plain dots.
ATTENTION_PRIMITIVES = frozenset({"dot_product_attention_fwd_wrapper", "dot_product_attention_fwd", "pallas_call"})


def _attention_saveable(prim, *_, **__) -> bool:
    return prim.name in ATTENTION_PRIMITIVES


def _remat_policy(name: str):
    """``full`` recomputes the block; ``dots`` saves matmul outputs; ``attn_out`` saves only the attention kernel's
    forward results (its recomputation is the costliest part of a long sequence's block); ``dots_attn`` both."""
    cp = jax.checkpoint_policies
    return {
        "full": cp.nothing_saveable,
        "dots": cp.checkpoint_dots,
        "dots_no_batch": cp.checkpoint_dots_with_no_batch_dims,
        "attn_out": _attention_saveable,
        "dots_attn": cp.save_from_both_policies(cp.checkpoint_dots, _attention_saveable),
    }[name]


def _cast_kernels(dtype):
    """``trans_in_fn`` of ``nn.map_variables``: block matmul kernels in the compute dtype, other leaves as stored."""

    def cast(variables):
        def one(path, x):
            if getattr(path[-1], "key", None) == "kernel" and hasattr(x, "astype") and x.dtype != dtype:
                return x.astype(dtype)
            return x

        return jax.tree_util.tree_map_with_path(one, variables)

    return cast


class Transformer(nn.Module):
    cfg: TransformerConfig

    def setup(self):
        cfg = self.cfg
        rdt = cfg.jnp_residual_dtype
        self.cfg_uncond = self.param(
            "cfg_uncond",
            nn.with_logical_partitioning(_cfg_uncond_init, ("text_length", "text_embed")),
            (cfg.text_maxlen, cfg.text_dim),
            F32,
        )
        # Unused by any forward (as in the reference); kept so that checkpoints round-trip.
        self.sos_token = self.param(
            "sos_token", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (cfg.embed_dim,), F32
        )
        self.text_proj = Linear((cfg.text_dim,), (cfg.embed_dim,), ("text_embed", "embed"), dtype=rdt, use_bias=True)
        self.word_embed = Linear((cfg.latent_dim,), (cfg.embed_dim,), (None, "embed"), dtype=rdt, use_bias=True)
        block = Block
        if cfg.remat != "none":
            # `layout` (4th argument after self) is static Python data.
            block = nn.remat(Block, policy=_remat_policy(cfg.remat), prevent_cse=False, static_argnums=(4,))
        blocks = nn.scan(
            block,
            variable_axes={"params": 0, "intermediates": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
            length=cfg.depth,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        if cfg.jnp_dtype != cfg.jnp_block_param_dtype and not self.is_initializing():
            # Mixed precision (fp32 weights, bf16 matmuls): cast the stacked kernels once, outside the layer loop, as
            # the same values each layer would cast. The backward then carries bf16 weight gradients through the
            # loop and converts them once; remat does not recast; under FSDP the layers gather bf16 weights.
            blocks = nn.map_variables(blocks, "params", trans_in_fn=_cast_kernels(cfg.jnp_dtype))
        self.blocks = blocks(cfg)
        self.norm_hidden_sates = RMSNorm(cfg.norm_eps, F32)
        self.head = Linear((cfg.embed_dim,), (2 * cfg.detail_bits,), ("embed", "bits"), use_bias=True)
        self.semantic_head2 = Linear((cfg.embed_dim,), (2 * cfg.semantic_bits,), ("embed", "bits"), use_bias=True)

    # -- pieces -------------------------------------------------------------------------------------------------
    def embed_text(self, text, uncond_rows=None):
        """Text prefix tokens.

        Args:
          text: ``[B, Lt, text_dim]`` T5 features.
          uncond_rows: optional ``[B, Lt]`` int; where >= 0 the row is replaced by ``cfg_uncond[row]`` (classifier-free
            guidance branch / training text dropout: a dropped prompt of length n uses ``cfg_uncond[:n]``).
        Returns: ``[B, Lt, C]`` in the residual dtype.
        """
        if uncond_rows is not None:
            unc = jnp.take(self.cfg_uncond, jnp.maximum(uncond_rows, 0), axis=0)
            text = jnp.where((uncond_rows >= 0)[..., None], unc, text.astype(F32))
        return self.text_proj(text)

    def embed_visual(self, feats):
        """``[B, L, 64]`` latent features -> ``[B, L, C]`` tokens (zeros give ``word_embed.bias``)."""
        return self.word_embed(feats)

    def run_blocks(self, h, positions, layout=None, key_valid=None, prefix=None):
        """All blocks. ``positions`` ``[B, L, 4]``; ``prefix`` = per-layer (k, v, valid) with leading layer axis."""
        cos, sin = rope.cos_sin(positions, self.cfg.head_dim, self.cfg.rope_base)
        h = constrain(h, BATCH_LEN_EMBED)
        return self.blocks(h, cos, sin, layout, key_valid, prefix)

    def logits(self, h):
        """``[B, L, C]`` -> (detail ``[B, L, detail_bits, 2]``, semantic ``[B, L, semantic_bits, 2]``) fp32."""
        x = self.norm_hidden_sates(h).astype(F32)
        self.sow("intermediates", "final_norm_out", x)
        detail = self.head(x).reshape(*x.shape[:-1], self.cfg.detail_bits, 2)
        semantic = self.semantic_head2(x).reshape(*x.shape[:-1], self.cfg.semantic_bits, 2)
        return detail, semantic

    # -- entry points -------------------------------------------------------------------------------------------
    def __call__(self, visual, text, positions, layout: BlockLayout, *, uncond_rows=None, key_valid=None):
        """Teacher-forced forward of packed sequences.

        Args:
          visual: ``[B, Lv, 64]`` input features of all kept visual blocks (packing order).
          text: ``[B, Lt, text_dim]`` text rows of all packed prompts (each padded to its block length).
          positions: ``[B, L, 4]`` RoPE positions of the whole sequence [visual | text | pad] (pad rows: -1).
          layout: static block structure; ``layout.length = L >= Lv + Lt``.
          uncond_rows: ``[B, Lt]`` text-dropout rows (see ``embed_text``).
          key_valid: ``[B, L]`` False for padding tokens inside text blocks.
        Returns:
          (detail, semantic) logits of the visual tokens, ``[B, Lv, bits, 2]`` fp32.
        """
        b, lv, _ = visual.shape
        h = jnp.concatenate([self.embed_visual(visual), self.embed_text(text, uncond_rows)], axis=1)
        pad = layout.length - h.shape[1]
        if pad < 0:
            raise ValueError(f"{h.shape[1]} tokens exceed the layout length {layout.length}")
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        self.sow("intermediates", "h0", h)
        h, _ = self.run_blocks(h, positions, layout=layout, key_valid=key_valid)
        return self.logits(h[:, :lv])

    def text_step(self, text, positions, valid, uncond_rows=None):
        """The sampler's first step: text tokens attend only to themselves (padding excluded).

        Returns the per-layer K/V ``([layers, B, Lt, Hkv, hd] x 2)`` to cache.
        """
        h = self.embed_text(text, uncond_rows)
        layout = BlockLayout((h.shape[1],), ((0,),))
        _, (k, v) = self.run_blocks(h, positions, layout=layout, key_valid=valid)
        return k, v

    def visual_step(self, feats, positions, prefix_k, prefix_v, prefix_valid):
        """One AR step: the tokens of one scale attend to themselves and the cached prefix.

        Args:
          feats: ``[B, L, 64]`` input features (or zeros at a clip's first scale).
          positions: ``[B, L, 4]``.
          prefix_k, prefix_v: ``[layers, B, Lp, Hkv, hd]`` cached keys/values (referenced scale(s), text last).
          prefix_valid: ``[B, Lp]`` bool.
        Returns:
          ((detail, semantic) logits fp32, (k, v) of this step ``[layers, B, L, Hkv, hd]``).
        """
        h = self.embed_visual(feats)
        valid = jnp.broadcast_to(prefix_valid, (prefix_k.shape[0],) + prefix_valid.shape)
        h, kv = self.run_blocks(h, positions, prefix=(prefix_k, prefix_v, valid))
        return self.logits(h), kv


def _cfg_uncond_init(key, shape, dtype=F32):
    """Learned unconditional text embedding: trunc-normal std 1.2 (cut at ±2 absolute), divided by sqrt(text_dim)."""
    x = jax.random.truncated_normal(key, -2.0 / 1.2, 2.0 / 1.2, shape, F32) * 1.2
    return (x / jnp.sqrt(shape[-1])).astype(dtype)


def init_params(cfg: TransformerConfig, rng, *, text_len: int = 4, visual_len: int = 4):
    """Unboxed-free param init (boxed with logical names) on tiny dummy inputs."""
    model = Transformer(cfg)
    lv, lt = visual_len, text_len
    layout = BlockLayout((lv, lt), ((0, 1), (1,)))
    pos = jnp.zeros((1, lv + lt, 4), jnp.int32)
    return model.init(rng, jnp.zeros((1, lv, cfg.latent_dim)), jnp.zeros((1, lt, cfg.text_dim)), pos, layout)
