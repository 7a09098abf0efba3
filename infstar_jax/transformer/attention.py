"""Spacetime sparse attention (SPEC §1.9, §1.10) and the one attention dispatcher.

A packed training sequence is a list of *blocks* (visual scale blocks, text blocks, padding). Block ``i`` attends to
the blocks in ``BlockLayout.sees[i]`` (itself, its example's text, the last scale of the previous clip) and to nothing
else. ``BlockLayout`` is static (numpy, hashable): the attention is computed as a short list of dense calls, one per
large block over exactly the keys it may see (gathered), and one per run of small consecutive blocks with a small
static mask. No ``L x L`` mask or score matrix exists in this path; ``BlockLayout.dense_mask`` exists only as the
test oracle.

``dot_product_attention`` is the single kernel entry point; it picks the implementation per backend (XLA on CPU,
cuDNN on GPU when shapes allow, the Pallas splash kernel on TPU: ``splash.py``). On TPU ``block_sparse_attention`` is
one splash call whose block-sparse mask skips the empty tiles. The TPU target is recognised from the platform of the
current mesh as well as from the default backend, so that ahead-of-time compilation for a TPU topology on a CPU host
(``infstar_jax.aot``) traces the TPU path.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# The sampler's calls with fewer queries use cuDNN over the concatenated keys. 0 by default: with every call on the
# Mosaic kernel the 480p sampler measured 14.1 s against 14.6 s with the calls below 2,048 queries on cuDNN (H200).
MOSAIC_MIN_QUERIES = int(os.environ.get("INFSTAR_MOSAIC_MIN_QUERIES", 0))

# Runs of consecutive small blocks are merged into one masked call while their total query length stays below this.
SMALL_GROUP_TOKENS = 512


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Static block structure of a packed sequence.

    Attributes:
      lengths: token count of each block, in sequence order (sum = L).
      sees: for each block, the indices of the blocks its queries attend to; ``()`` = attends to nothing (padding:
        its attention output is 0, like FlexAttention's fully-masked rows).
    """

    lengths: tuple[int, ...]
    sees: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        if len(self.lengths) != len(self.sees):
            raise ValueError(f"{len(self.lengths)} block lengths but {len(self.sees)} visibility rows")
        for i, row in enumerate(self.sees):
            bad = [j for j in row if not 0 <= j < len(self.lengths)]
            if bad:
                raise ValueError(f"block {i} sees unknown blocks {bad}")

    @staticmethod
    def from_table(lengths: Sequence[int], table: np.ndarray) -> "BlockLayout":
        """From block lengths and a boolean ``[n, n]`` table (row = query block may attend column = key block)."""
        table = np.asarray(table, bool)
        n = len(lengths)
        return BlockLayout(
            tuple(int(x) for x in lengths), tuple(tuple(int(j) for j in np.nonzero(table[i, :n])[0]) for i in range(n))
        )

    @property
    def length(self) -> int:
        return int(sum(self.lengths))

    @functools.cached_property
    def offsets(self) -> tuple[int, ...]:
        return tuple(int(x) for x in np.concatenate([[0], np.cumsum(self.lengths)[:-1]])) if self.lengths else ()

    def block_ids(self) -> np.ndarray:
        """``[L]`` int32 block index of every token."""
        return np.repeat(np.arange(len(self.lengths), dtype=np.int32), self.lengths)

    def table(self) -> np.ndarray:
        n = len(self.lengths)
        t = np.zeros((n, n), bool)
        for i, row in enumerate(self.sees):
            t[i, list(row)] = True
        return t

    def dense_mask(self) -> np.ndarray:
        """``[L, L]`` bool token mask (test oracle only)."""
        ids = self.block_ids()
        return self.table()[ids[:, None], ids[None, :]]

    def calls(self, small: int = SMALL_GROUP_TOKENS) -> list["AttentionCall"]:
        """Partition of the sequence into dense attention calls covering every query block that sees something."""
        out: list[AttentionCall] = []
        group: list[int] = []

        def flush():
            if not group:
                return
            keys = sorted({j for i in group for j in self.sees[i]})
            if len(group) == 1 and set(self.sees[group[0]]) == set(keys):
                mask = None  # one block seeing whole blocks: unmasked
            else:
                q_ids = np.repeat(np.asarray(group), [self.lengths[i] for i in group])
                k_ids = np.repeat(np.asarray(keys), [self.lengths[j] for j in keys])
                mask = self.table()[q_ids[:, None], k_ids[None, :]]
            out.append(AttentionCall(tuple(group), tuple(keys), None if mask is None else _Frozen(mask)))
            group.clear()

        for i, n in enumerate(self.lengths):
            if not self.sees[i]:
                flush()
                continue
            if n >= small:
                flush()
                group.append(i)
                flush()
                continue
            if group and sum(self.lengths[g] for g in group) + n > small:
                flush()
            group.append(i)
        flush()
        return out


@dataclasses.dataclass(frozen=True)
class _Frozen:
    """A numpy array usable inside a frozen/hashable dataclass (hashed by content)."""

    array: np.ndarray

    def __hash__(self):
        return hash((self.array.shape, self.array.tobytes()))

    def __eq__(self, other):
        return isinstance(other, _Frozen) and np.array_equal(self.array, other.array)


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """One dense call: query blocks ``q_blocks`` (consecutive) against key blocks ``k_blocks`` (with optional mask)."""

    q_blocks: tuple[int, ...]
    k_blocks: tuple[int, ...]
    mask: _Frozen | None


def _xla_attention(q, k, v, bias):
    """Reference-precision attention: fp32 scores and softmax.

    q: [B, Lq, Hkv, G, D], k/v: [B, Lk, Hkv, D], bias: [B or 1, Lq, Lk] additive (or None).
    """
    scale = q.shape[-1] ** -0.5
    s = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        s = s + bias[:, None, None, :, :]
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    # A query that sees no key (all -inf) gets output 0, like FlexAttention.
    p = p / jnp.where(denom > 0, denom, 1.0)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o


def dot_product_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    *,
    mask: np.ndarray | None = None,
    key_valid: jnp.ndarray | None = None,
    implementation: str | None = None,
) -> jnp.ndarray:
    """Non-causal GQA attention with scale ``head_dim**-0.5``.

    Args:
      q: ``[B, Lq, H, D]``; k, v: ``[B, Lk, Hkv, D]``; query head ``h`` uses kv head ``h // (H / Hkv)``.
      mask: optional static ``[Lq, Lk]`` bool (True = may attend).
      key_valid: optional ``[B, Lk]`` bool (False = padding key).
      implementation: ``None`` (auto), ``"xla"``, ``"cudnn"`` or ``"splash"``.
    Returns:
      ``[B, Lq, H, D]`` in ``v.dtype``.
    """
    b, lq, h, d = q.shape
    hkv = k.shape[2]
    if h % hkv:
        raise ValueError(f"{h} query heads are not a multiple of {hkv} kv heads")
    if _use_splash(implementation):
        from infstar_jax.transformer import splash

        return splash.attention(q, k, v, mask=mask, key_valid=key_valid).astype(v.dtype)
    impl = implementation or ("cudnn" if _cudnn_ok(q, k, mask) else "xla")
    if impl == "cudnn":
        return _cudnn_attention(q, k, v, key_valid)
    bias = None
    if mask is not None:
        bias = jnp.where(jnp.asarray(mask), 0.0, -jnp.inf)[None]
    if key_valid is not None:
        kb = jnp.where(key_valid, 0.0, -jnp.inf)[:, None, :]
        bias = kb if bias is None else bias + kb
    o = _xla_attention(q.reshape(b, lq, hkv, h // hkv, d), k, v, bias)
    return o.reshape(b, lq, h, d).astype(v.dtype)


def _use_splash(implementation: str | None) -> bool:
    """Splash when asked for, or by default when the program is being built for TPU."""
    if implementation is not None:
        return implementation == "splash"
    return _target_platform() == "tpu"


def _target_platform() -> str:
    """Platform of the current mesh's devices (an AOT topology mesh included), else the default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return getattr(device, "platform", None) or jax.default_backend()


def _cudnn_ok(q, k, mask) -> bool:
    return (
        mask is None
        and jax.default_backend() == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and q.shape[-1] % 8 == 0
    )


def _cudnn_attention(q, k, v, key_valid):
    """cuDNN flash attention; padding keys must sit at the end of each row (callers put text last)."""
    lengths = None
    if key_valid is not None:
        lengths = jnp.sum(key_valid.astype(jnp.int32), axis=-1)
    return jax.nn.dot_product_attention(
        q, k, v, key_value_seq_lengths=lengths, implementation="cudnn"
    )


def prefix_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    prefix_k: jnp.ndarray,
    prefix_v: jnp.ndarray,
    prefix_valid: jnp.ndarray,
    *,
    maskable_tail: int | None = None,
    implementation: str | None = None,
    interpret=None,
) -> jnp.ndarray:
    """The sampler's attention: the current tokens see themselves and a cached prefix (referenced scales, text last).

    Args:
      q: ``[B, L, H, D]``; k, v: ``[B, L, Hkv, D]`` of the same tokens; prefix_k/v ``[B, Lp, Hkv, D]``;
        prefix_valid ``[B, Lp]`` bool (False = padded text key, only at the end of a row).
      maskable_tail: if given, ``prefix_valid`` is True except maybe in its last ``maskable_tail`` keys (the text);
        the Mosaic kernel then applies the mask to those blocks only.
      implementation: ``None`` (auto: ``"mosaic"`` on Hopper GPUs for bf16/fp16 and ``MOSAIC_MIN_QUERIES`` or more
        queries, else the dispatcher of ``dot_product_attention`` over the concatenated keys), ``"mosaic"``, or any
        ``dot_product_attention`` choice.
      interpret: with ``"mosaic"``, Mosaic GPU interpret-mode parameters (tests on CPU).
    Returns:
      ``[B, L, H, D]`` in ``v.dtype``.
    """
    prefix_k, prefix_v = prefix_k.astype(k.dtype), prefix_v.astype(v.dtype)
    if implementation is None:
        implementation = "mosaic" if _mosaic_ok(q) and q.shape[1] >= MOSAIC_MIN_QUERIES else None
    if implementation != "mosaic":
        kk = jnp.concatenate([k, prefix_k], axis=1)
        vv = jnp.concatenate([v, prefix_v], axis=1)
        valid = jnp.concatenate([jnp.ones(k.shape[:2], bool), prefix_valid], axis=1)
        return dot_product_attention(q, kk, vv, key_valid=valid, implementation=implementation)
    from infstar_jax.transformer import flash_mgpu

    tiling = flash_mgpu.default_tiling(q.shape[1])
    length, lp = q.shape[1], prefix_k.shape[1]

    def pad_to(x, n, value=0):
        if x.shape[1] == n:
            return x
        widths = [(0, 0)] * x.ndim
        widths[1] = (0, n - x.shape[1])
        return jnp.pad(x, widths, constant_values=value)

    # The kernel's TMA copies need sequence lengths in multiples of 8 (the large scales already are).
    length8, lp8 = -(-length // 8) * 8, -(-lp // 8) * 8
    q, k, v = pad_to(q, length8), pad_to(k, length8), pad_to(v, length8)
    if not lp:
        o = flash_mgpu.flash_attention(q, [k], [v], [length], tiling=tiling, interpret=interpret)
        return o[:, :length].astype(v.dtype)
    prefix_k, prefix_v = pad_to(prefix_k, lp8), pad_to(prefix_v, lp8)
    prefix_len = jnp.sum(prefix_valid.astype(jnp.int32), axis=1)
    # Only the prefix's last ``maskable_tail`` keys (the text) can be padding.
    first_maskable = max(lp - maskable_tail, 0) if maskable_tail is not None else 0
    o = flash_mgpu.flash_attention(q, [k, prefix_k], [v, prefix_v], [length, prefix_len], [0, first_maskable],
                                   tiling=tiling, interpret=interpret)
    return o[:, :length].astype(v.dtype)


def _mosaic_ok(q) -> bool:
    return (
        q.dtype in (jnp.bfloat16, jnp.float16)
        and q.shape[-1] in (64, 128)  # the default tiles fit shared memory up to 128
        and _target_platform() == "gpu"
        and _unsharded()
        and _hopper()
    )


def _unsharded() -> bool:
    """True outside a multi-device mesh: the kernel is a custom call that XLA cannot partition, so sharded programs
    (prompts over several GPUs) keep cuDNN, which XLA partitions."""
    mesh = jax.sharding.get_abstract_mesh()
    return getattr(mesh, "empty", True) or mesh.size == 1


@functools.cache
def _hopper() -> bool:
    from infstar_jax.transformer import flash_mgpu

    return flash_mgpu.available()


def block_sparse_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    layout: BlockLayout,
    *,
    key_valid: jnp.ndarray | None = None,
    implementation: str | None = None,
) -> jnp.ndarray:
    """Attention over a packed sequence with the static block structure ``layout``.

    Args:
      q: ``[B, L, H, D]``; k, v: ``[B, L, Hkv, D]`` (all rows of the batch share ``layout``).
      key_valid: optional ``[B, L]`` bool; False marks padding tokens inside blocks (e.g. padded text).
    Returns:
      ``[B, L, H, D]``; rows of blocks that see nothing are 0.
    """
    if q.shape[1] != layout.length:
        raise ValueError(f"sequence length {q.shape[1]} != layout length {layout.length}")
    if _use_splash(implementation):
        from infstar_jax.transformer import splash

        return splash.block_sparse_attention(q, k, v, layout, key_valid=key_valid).astype(v.dtype)
    off, lens = layout.offsets, layout.lengths
    pieces = []
    pos = 0

    def take(x, blocks):
        return jnp.concatenate([x[:, off[j] : off[j] + lens[j]] for j in blocks], axis=1)

    for call in layout.calls():
        start = off[call.q_blocks[0]]
        stop = off[call.q_blocks[-1]] + lens[call.q_blocks[-1]]
        if start > pos:
            pieces.append(jnp.zeros(q.shape[:1] + (start - pos,) + q.shape[2:], v.dtype))
        # Keys: the query blocks' own blocks first, the rest after, so padded text blocks (key_valid) end the row.
        kb = _order_keys(call.k_blocks, call.q_blocks)
        kk, vv = take(k, kb), take(v, kb)
        kv_valid = None if key_valid is None else take(key_valid, kb)
        mask = None
        if call.mask is not None:
            perm = np.concatenate([np.arange(off_k, off_k + lens[j]) for j, off_k in _key_offsets(call.k_blocks, lens, kb)])
            mask = call.mask.array[:, perm]
        pieces.append(
            dot_product_attention(
                q[:, start:stop], kk, vv, mask=mask, key_valid=kv_valid, implementation=implementation
            )
        )
        pos = stop
    if pos < layout.length:
        pieces.append(jnp.zeros(q.shape[:1] + (layout.length - pos,) + q.shape[2:], v.dtype))
    return jnp.concatenate(pieces, axis=1) if len(pieces) > 1 else pieces[0]


def _order_keys(k_blocks, q_blocks):
    own = [j for j in k_blocks if j in q_blocks]
    return tuple(own + [j for j in k_blocks if j not in q_blocks])


def _key_offsets(k_blocks, lens, ordered):
    """For each block in ``ordered``: (block, offset of that block inside the call's original key order)."""
    pos, where = 0, {}
    for j in k_blocks:
        where[j] = pos
        pos += lens[j]
    return [(j, where[j]) for j in ordered]
