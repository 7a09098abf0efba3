"""Spacetime block-sparse attention on TPU through JAX's Pallas splash-attention kernel (SPEC §1.9).

The packed training sequence's ``BlockLayout`` becomes one splash mask: token ``q`` may see token ``k`` iff
``table[block(q), block(k)]``. Splash tiles the ``L x L`` score matrix and, from the mask, lists per query tile only
the key tiles that hold at least one visible pair: tiles between blocks that do not see each other (other examples,
scales of the same clip, text -> visual) are never loaded nor computed. Tiles wholly inside a visible block pair run
unmasked; only tiles straddling a block boundary carry an explicit ``[block_q, block_kv]`` boolean pattern.

Two details make the kernel's results equal the dense masked oracle (``BlockLayout.dense_mask``):

* splash needs every query row to see at least one key (its softmax would divide by zero otherwise), so rows that see
  nothing (the pad block, the tokens added to reach a multiple of the tile size) are given their own block to look
  at, and their output rows are set to 0 afterwards, as FlexAttention does for fully masked rows;
* ``key_valid`` (padding rows inside text slots, data rather than layout) enters as splash segment ids (queries are
  segment 0, an invalid key segment 1), and a row whose visible keys are all invalid is also set to 0.

The kernel runs per example and per device shard: batch rows are mapped over with ``vmap``, and under a mesh the
call sits in a ``jax.shard_map`` over the batch (``activation_batch``) and head (``activation_heads``) axes of the
logical rules, since a Pallas call cannot be partitioned by the SPMD partitioner. On CPU it runs with
``interpret=True`` (tests); on TPU it compiles to Mosaic.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

from infstar_jax.parallel import DEFAULT_RULES, logical_to_spec
from infstar_jax.transformer.attention import BlockLayout

# Tile sizes: 512 is what TPU splash kernels are usually run with on long sequences; short sequences use the
# smallest tile that covers them (a multiple of the 128-lane width).
MAX_BLOCK = 512
LANES = 128


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def block_size_for(length: int, max_block: int = MAX_BLOCK) -> int:
    """Tile size for a sequence of ``length`` tokens: ``min(max_block, length rounded up to 128)``."""
    if max_block % LANES:
        raise ValueError(f"splash tile size {max_block} must be a multiple of {LANES}")
    return min(max_block, round_up(max(length, 1), LANES))


class LayoutMask(splash_mask.Mask):
    """The ``[Lp, Lp]`` boolean splash mask of a ``BlockLayout`` padded to ``padded_length`` tokens.

    Rows of blocks that see nothing, and the padding tokens (one extra group), see their own group so that no row is
    empty; callers zero those rows (``empty_rows``). Slices are computed on demand from the block table: the
    ``L x L`` mask never exists in memory.
    """

    def __init__(self, layout: BlockLayout, padded_length: int):
        if padded_length < layout.length:
            raise ValueError(f"padded length {padded_length} < layout length {layout.length}")
        self.layout = layout
        self.padded_length = int(padded_length)
        n = len(layout.lengths)
        ids = np.concatenate([layout.block_ids(), np.full(padded_length - layout.length, n, np.int32)])
        table = np.zeros((n + 1, n + 1), bool)
        table[:n, :n] = layout.table()
        empty = ~table.any(axis=1)
        table[empty, empty] = True  # a see-nothing block (or the padding group) sees itself only
        self._ids = ids.astype(np.int32)
        self._table = table
        self._empty_group = empty

    @property
    def shape(self) -> tuple[int, int]:
        return (self.padded_length, self.padded_length)

    def __getitem__(self, idx) -> np.ndarray:
        if len(idx) != 2:
            raise NotImplementedError(f"unsupported slice {idx}")
        q_slice, kv_slice = idx
        qi, ki = self._ids[q_slice], self._ids[kv_slice]
        # Block ids never decrease along the sequence, so a tile inside one (query block, key block) pair is constant:
        # the common case, and the one worth making fast (the kernel builder visits every tile several times).
        if len(qi) and len(ki) and qi[0] == qi[-1] and ki[0] == ki[-1]:
            return np.full((len(qi), len(ki)), self._table[qi[0], ki[0]])
        return self._table[qi][:, ki]

    def empty_rows(self) -> np.ndarray:
        """``[Lp]`` bool: rows whose output must be 0 (see-nothing blocks and padding)."""
        return self._empty_group[self._ids]

    def __eq__(self, other):
        return isinstance(other, LayoutMask) and (self.layout, self.padded_length) == (
            other.layout,
            other.padded_length,
        )

    def __hash__(self):
        return hash((LayoutMask, self.layout, self.padded_length))


def _block_sizes(bq: int, bkv: int) -> splash_kernel.BlockSizes:
    return splash_kernel.BlockSizes(
        block_q=bq, block_kv=bkv, block_kv_compute=bkv,
        block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
        block_q_dq=bq, block_kv_dq=bkv,
    )


def _layout_kernel(layout: BlockLayout, padded_length: int, heads: int, block: int, interpret: bool):
    """Splash kernel for ``heads`` query heads sharing one layout mask, and the ``[Lp]`` rows to zero.

    Built while tracing (its tile tables become constants of the traced program; about a second per kernel for a
    40k-token sequence), never cached across traces: under a mesh of another host's devices (AOT for a pod) the
    tables must not be materialised as device arrays.
    """
    mask = LayoutMask(layout, padded_length)
    kernel = splash_kernel.make_splash_mha(
        splash_mask.MultiHeadMask([mask] * heads), block_sizes=_block_sizes(block, block),
        head_shards=1, q_seq_shards=1, interpret=interpret,
    )
    return kernel, mask.empty_rows()


def _full_kernel(lq: int, lk: int, heads: int, bq: int, bkv: int, interpret: bool, mask: np.ndarray | None = None):
    """Splash kernel for unmasked (or statically masked: ``mask`` ``[lq, lk]`` bool) attention."""
    m = splash_mask.FullMask((lq, lk)) if mask is None else splash_mask.NumpyMask(mask)
    return splash_kernel.make_splash_mha(
        splash_mask.MultiHeadMask([m] * heads), block_sizes=_block_sizes(bq, bkv),
        head_shards=1, q_seq_shards=1, interpret=interpret,
    )


def _default_interpret() -> bool:
    return jax.default_backend() != "tpu" and _mesh_platform() != "tpu"


def _mesh_platform() -> str | None:
    dev = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return getattr(dev, "platform", None)


def _rules():
    return tuple(nn.get_logical_axis_rules()) or DEFAULT_RULES


def shard_axes(b: int, h: int, hkv: int):
    """(batch axes, head axes) the kernel is split over under the current mesh, or ``None`` for either.

    Batch rows go over the ``activation_batch`` axes when they divide ``b``. Heads go over the ``activation_heads``
    axes and, since the kernel reads whole sequences, also over the ``activation_length`` (context) axes: the
    devices that hold pieces of one sequence each attend with a share of the heads instead of all repeating the
    same work. Axes are dropped from the end until their product divides both head counts.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None, None
    spec = logical_to_spec(("activation_batch", "activation_heads", "activation_length"), _rules())

    def flat(axes):
        return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))

    def size(axes):
        return int(np.prod([mesh.shape[a] for a in axes]))

    batch = flat(spec[0])
    batch = batch if size(batch) > 1 and b % size(batch) == 0 else ()
    heads = tuple(a for a in flat(spec[1]) + flat(spec[2]) if a not in batch and mesh.shape[a] > 1)
    while heads and (h % size(heads) or hkv % size(heads)):
        heads = heads[:-1]

    def as_spec(axes):
        return None if not axes else (axes[0] if len(axes) == 1 else axes)

    return as_spec(batch), as_spec(heads)


def _run_sharded(body, q, k, v, kv_seg):
    """Runs ``body(q, k, v, kv_seg)`` (``[B, L, H, D]`` layouts, local shapes) per device shard of the current mesh."""
    b, _, h, _ = q.shape
    batch_axes, head_axes = shard_axes(b, h, k.shape[2])
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return body(q, k, v, kv_seg)
    qkv_spec = P(batch_axes, None, head_axes, None)
    return jax.shard_map(
        body, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, P(batch_axes, None)), out_specs=qkv_spec,
        check_vma=False,
    )(q, k, v, kv_seg)


def _pad_len(x, length, value=0):
    pad = length - x.shape[1]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _apply(kernel, q, k, v, kv_seg):
    """Per-example splash call. q ``[B, Lq, H, D]``, k/v ``[B, Lk, Hkv, D]``, kv_seg ``[B, Lk]`` int32."""
    scale = q.shape[-1] ** -0.5
    # Splash takes head-major inputs and does not scale the scores itself.
    qh = jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2)
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    q_seg = jnp.zeros(q.shape[:2], jnp.int32)
    seg = splash_kernel.SegmentIds(q=q_seg, kv=kv_seg)
    # The kernel's matmuls take the ambient default precision; Mosaic refuses an fp32 contract precision on bf16
    # operands, so low-precision inputs always run at the native (bf16 x bf16 -> fp32) precision.
    precision = None if q.dtype == jnp.float32 else "default"
    with jax.default_matmul_precision(precision):
        out = jax.vmap(kernel)(qh, kh, vh, seg)
    return jnp.swapaxes(out, 1, 2)


def block_sparse_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    layout: BlockLayout,
    *,
    key_valid: jnp.ndarray | None = None,
    max_block: int = MAX_BLOCK,
    interpret: bool | None = None,
) -> jnp.ndarray:
    """Attention over a packed sequence with the static block structure ``layout``, as one splash kernel call.

    Args:
      q: ``[B, L, H, D]``; k, v: ``[B, L, Hkv, D]``; ``L = layout.length`` (padded internally to a tile multiple).
      key_valid: optional ``[B, L]`` bool; False marks padding keys.
      max_block: largest tile size (query and key tiles are equal).
      interpret: Pallas interpret mode (default: on unless compiling for TPU).
    Returns:
      ``[B, L, H, D]`` in ``q.dtype``; rows that see no valid key are 0.
    """
    b, length, h, d = q.shape
    if length != layout.length:
        raise ValueError(f"sequence length {length} != layout length {layout.length}")
    if k.shape[2] == 0 or h % k.shape[2]:
        raise ValueError(f"{h} query heads are not a multiple of {k.shape[2]} kv heads")
    interpret = _default_interpret() if interpret is None else interpret
    block = block_size_for(length, max_block)
    lp = round_up(length, block)
    valid = jnp.ones((b, length), bool) if key_valid is None else jnp.asarray(key_valid, bool)
    kv_seg = _pad_len(jnp.where(valid, 0, 1).astype(jnp.int32), lp)

    def body(q, k, v, kv_seg):
        kernel, empty = _layout_kernel(layout, lp, q.shape[2], block, interpret)
        return _apply(kernel, _pad_len(q, lp), _pad_len(k, lp), _pad_len(v, lp), kv_seg)

    out = _run_sharded(body, q, k, v, kv_seg)[:, :length]
    keep = ~LayoutMask(layout, lp).empty_rows()[:length]
    if key_valid is not None:
        keep = keep[None, :] & _rows_with_valid_key(layout, valid)
    else:
        keep = keep[None, :]
    return jnp.where(keep[:, :, None, None], out, jnp.zeros((), out.dtype))


def _rows_with_valid_key(layout: BlockLayout, valid: jnp.ndarray) -> jnp.ndarray:
    """``[B, L]`` bool: the token's block sees at least one valid key (per-block reduction, no ``L x L`` work)."""
    ids = jnp.asarray(layout.block_ids())
    n = len(layout.lengths)
    block_has = jax.vmap(lambda v: jax.ops.segment_max(v.astype(jnp.int32), ids, n) > 0)(valid)  # [B, n]
    sees_valid = jnp.any(jnp.asarray(layout.table())[None] & block_has[:, None, :], axis=-1)  # [B, n]
    return sees_valid[:, ids]


def attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    *,
    mask: Any = None,
    key_valid: jnp.ndarray | None = None,
    max_block: int = MAX_BLOCK,
    interpret: bool | None = None,
) -> jnp.ndarray:
    """Non-causal GQA attention through splash (the sampler's steps: current tokens against the cached prefix).

    Args:
      q: ``[B, Lq, H, D]``; k, v: ``[B, Lk, Hkv, D]``.
      mask: optional static ``[Lq, Lk]`` bool (numpy); passed as a splash ``NumpyMask``.
      key_valid: optional ``[B, Lk]`` bool (False = padding key).
    Returns:
      ``[B, Lq, H, D]`` in ``q.dtype``; rows that see no valid key are 0.
    """
    b, lq, h, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    if hkv == 0 or h % hkv:
        raise ValueError(f"{h} query heads are not a multiple of {hkv} kv heads")
    interpret = _default_interpret() if interpret is None else interpret
    bq, bkv = block_size_for(lq, max_block), block_size_for(lk, max_block)
    lqp, lkp = round_up(lq, bq), round_up(lk, bkv)
    valid = jnp.ones((b, lk), bool) if key_valid is None else jnp.asarray(key_valid, bool)
    # Padded keys are invalid (segment 1); padded query rows are dropped.
    kv_seg = _pad_len(jnp.where(valid, 0, 1).astype(jnp.int32), lkp, value=1)
    static = None
    if mask is not None:
        static = np.zeros((lqp, lkp), bool)
        static[:lq, :lk] = np.asarray(mask, bool)
        static[lq:, :] = True  # padded query rows: any key, dropped below
        static[:lq, lk:][~static[:lq, :lk].any(axis=1)] = True  # empty rows: a padded key, zeroed below

    def body(q, k, v, kv_seg):
        kernel = _full_kernel(lqp, lkp, q.shape[2], bq, bkv, interpret, static)
        return _apply(kernel, _pad_len(q, lqp), _pad_len(k, lkp), _pad_len(v, lkp), kv_seg)

    out = _run_sharded(body, q, k, v, kv_seg)[:, :lq]
    if static is None:
        keep = jnp.any(valid, axis=-1)[:, None]
    else:
        keep = jnp.any(jnp.asarray(static[:lq, :lk])[None] & valid[:, None, :], axis=-1)
    keep = jnp.broadcast_to(keep, (b, lq))
    return jnp.where(keep[:, :, None, None], out, jnp.zeros((), out.dtype))
