"""Flash attention for Hopper GPUs (Pallas Mosaic GPU), for the sampler's large non-causal calls.

Why a kernel of our own: at the 720p sampler's shapes cuDNN's fused attention runs at ~560 TFLOP/s and attention is
~58 % of the AR loop (docs/benchmarks.md). A warp-specialised kernel with two consumer warpgroups that take turns on
the tensor cores (one computes its softmax while the other multiplies) goes faster, and lets the sampler read its keys
where they already are: the current scale's K/V and the cached prefix are separate operands (no concatenation).

Layout and semantics (as ``attention.dot_product_attention``): ``q`` ``[B, Lq, H, D]``; each key part ``[B, L_i,
Hkv, D]`` with query head ``h`` reading kv head ``h // (H / Hkv)``; scale ``D**-0.5``; no causal mask. Each key part
has a valid length (static, or per row at run time: the text's padding); the kernel compares key indices with it
only in the blocks that can hold an invalid key (so fully valid blocks pay nothing). Every query row must see a valid
key in the first block (the caller puts always-valid keys first). The kernel is one custom call for the whole batch:
callers use it in single-device programs (``attention.prefix_attention`` keeps cuDNN under a multi-device mesh).

Tiles are staged in the operands' dtype (bf16 or fp16), scores and softmax statistics in fp32, probabilities rounded
to the operand dtype for the second matmul (as cuDNN and FlashAttention do).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class Tiling:
    """``block_q`` query rows per consumer warpgroup (a CTA has two), ``block_kv`` keys per step, ``stages`` K/V
    buffers in flight."""

    block_q: int = 64
    block_kv: int = 128
    stages: int = 2

    def __post_init__(self):
        if self.block_q % 64 or self.block_kv % 64:
            # (the P·V product's contraction over a key block must be a multiple of 64 for Mosaic GPU's wgmma)
            raise ValueError(f"block_q and block_kv must be multiples of 64, got {self}")
        if self.stages < 2:
            raise ValueError(f"stages must be at least 2, got {self.stages}")

    @classmethod
    def parse(cls, spec: str) -> "Tiling":
        """``"block_q/block_kv/stages"``, e.g. ``"64/128/2"``."""
        try:
            bq, bk, st = (int(x) for x in spec.split("/"))
        except ValueError:
            raise ValueError(f"tiling {spec!r} is not block_q/block_kv/stages (e.g. 64/128/2)") from None
        return cls(bq, bk, st)


def default_tiling(queries: int) -> Tiling:
    """The sampler's tiling for a call with ``queries`` query rows; ``INFSTAR_FLASH_TILING=block_q/block_kv/stages``
    overrides it (benchmarks).

    Key blocks of 192 (the largest with two stages in shared memory) run the large calls faster than blocks of 128
    (H200: 720p last scale 282 vs 294 ms, 480p last scale 53.5 vs 57.3 ms, 8,160 queries 3.9-4.0 vs 4.0 ms); on small
    calls they are slower (0.20 vs 0.19 ms at 960 queries) (docs/benchmarks.md).
    """
    spec = os.environ.get("INFSTAR_FLASH_TILING")
    if spec:
        return Tiling.parse(spec)
    return Tiling(block_kv=192 if queries >= 4_096 else 128)


def available() -> bool:
    """True when the default backend is a Hopper-class NVIDIA GPU and Mosaic GPU imports."""
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return False
    if dev.platform != "gpu" or "NVIDIA" not in getattr(dev, "device_kind", "NVIDIA"):
        return False
    try:
        cc = float(getattr(dev, "compute_capability", "0"))
    except ValueError:
        return False
    if not 9.0 <= cc < 10.0:
        return False
    try:
        importlib.import_module("jax.experimental.pallas.mosaic_gpu")
    except ImportError:
        return False
    return True


def flash_attention(
    q: jax.Array,
    ks: Sequence[jax.Array],
    vs: Sequence[jax.Array],
    lengths: Sequence[int | jax.Array | None] | None = None,
    maskable_from: Sequence[int] | None = None,
    *,
    tiling: Tiling = Tiling(),
    interpret=None,
) -> jax.Array:
    """Attention of ``q`` over the concatenation of the key parts, read in place.

    Args:
      q: ``[B, Lq, H, D]``, ``Lq`` a multiple of 8 (a last partial tile of queries is clipped by the TMA copies).
      ks, vs: key / value parts ``[B, L_i, Hkv, D]``, ``L_i`` a multiple of 8. Each part is read in blocks of
        ``block_kv`` keys (steps); a part's last partial block reads zeros past its end, masked.
      lengths: per part, the number of valid keys (the first ones): ``None`` (all ``L_i``), a static int, or a
        ``[B]`` int32 array (per row). Masking costs a compare per score, and only in the blocks that can hold an
        invalid key: for per-row lengths, from key ``maskable_from[i]`` (static; default 0) on.
      interpret: passed to ``plgpu.kernel`` (GPU interpret mode runs the kernel on CPU for tests).
    Every query row must see a valid key in the first block (the caller puts always-valid keys first).

    Returns:
      ``[B, Lq, H, D]`` in ``q.dtype``.
    """
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    bq, bk, stages = tiling.block_q, tiling.block_kv, tiling.stages
    b, lq, h, d = q.shape
    if len(ks) != len(vs) or not ks:
        raise ValueError(f"need matching non-empty key and value parts, got {len(ks)} and {len(vs)}")
    nparts = len(ks)
    lengths = list(lengths) if lengths is not None else [None] * nparts
    maskable_from = list(maskable_from) if maskable_from is not None else [0] * nparts
    if len(lengths) != nparts or len(maskable_from) != nparts:
        raise ValueError(f"lengths / maskable_from need one entry per key part ({nparts})")
    dtype = q.dtype
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"q must be bf16 or fp16, got {dtype}")
    hkv = ks[0].shape[2]
    for i, (k, v) in enumerate(zip(ks, vs)):
        if k.shape != v.shape or k.shape[0] != b or k.shape[2:] != (hkv, d) or not k.shape[1] or k.shape[1] % 8:
            raise ValueError(f"key part {i}: k {k.shape} / v {v.shape} must be [{b}, L (a multiple of 8), {hkv}, {d}]")
        if k.dtype != dtype or v.dtype != dtype:
            raise ValueError(f"key part {i} dtype {k.dtype}/{v.dtype} differs from q's {dtype}")
    if h % hkv:
        raise ValueError(f"{h} query heads are not a multiple of {hkv} kv heads")
    if d % 64:
        raise ValueError(f"head_dim {d} must be a multiple of 64")
    if lq % 8:
        raise ValueError(f"query length {lq} must be a multiple of 8")
    group = h // hkv
    part_steps = [-(-k.shape[1] // bk) for k in ks]
    n_steps = sum(part_steps)
    part_start = [sum(part_steps[:i]) for i in range(nparts)]
    depth = min(stages, n_steps)
    scale_log2 = d**-0.5 * _LOG2E

    # Static runs of key blocks in key order, (part, first block, end block, mask), for both sides of the pipeline;
    # mask is None, ("static", valid keys) or ("dynamic", column of the per-row lengths array).
    dynamic = []
    runs = []
    for p, (k, n_valid) in enumerate(zip(ks, lengths)):
        nblk = part_steps[p]
        if n_valid is None or isinstance(n_valid, int):
            n_valid = k.shape[1] if n_valid is None else n_valid
            if not 0 < n_valid <= k.shape[1]:
                raise ValueError(f"key part {p}: {n_valid} valid keys of {k.shape[1]}")
            first = n_valid // bk
            mask = ("static", n_valid)
        else:
            if n_valid.shape != (b,):
                raise ValueError(f"key part {p}: per-row lengths must have shape ({b},), got {n_valid.shape}")
            first = min(maskable_from[p] // bk, nblk)
            mask = ("dynamic", len(dynamic))
            dynamic.append(n_valid)
        if first > 0:
            runs.append((p, 0, first, None))
        if first < nblk:
            runs.append((p, first, nblk, mask))
    dyn_lengths = jnp.stack(dynamic, axis=1).astype(jnp.int32) if dynamic else None

    def body(q_ref, *refs):
        k_refs, v_refs = refs[:nparts], refs[nparts:2 * nparts]
        rest = refs[2 * nparts:]
        len_ref = rest[0] if dyn_lengths is not None else None
        out_ref, scratch = rest[-2], rest[-1]
        (qo_smem2, k_smem, v_smem), (k_bar, v_bar, q_bar), (k_free, v_free), turn = scratch
        batch = lax.axis_index("batch")
        head = lax.axis_index("heads")
        wg = lax.axis_index("wg")

        def take_turn():
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        def laid_out(x, layout):  # register layouts are a compile-time notion; the interpreter has none
            return x if interpret is not None else plgpu.layout_cast(x, layout)

        def release(barrier, s, slot):
            # Only buffers that will be refilled are handed back (every arrival is awaited by the producer).
            @pl.when(s + depth < n_steps)
            def _():
                plgpu.barrier_arrive(barrier.at[slot])

        def row_length(column):
            # This row's valid key count from the small [B, n] lengths array (static reads, one per batch row).
            n = len_ref[0, column]
            for i in range(1, b):
                n = jnp.where(batch == i, len_ref[i, column], n)
            return n

        def softmax(scores, m_i, l_i, limit):
            """Online softmax of one block of raw scores: (probabilities in the operand dtype, new row max, new row
            sum, rescale factor of the earlier accumulator). ``limit``: None, or the number of valid keys counted
            from this block's first key. Statistics are in log2 units of the scaled scores, so that each probability
            is one FMA and an exp2 (the scale commutes with the row max; it is positive)."""
            if limit is not None:
                if interpret is None:
                    col = plgpu.broadcasted_iota(jnp.int32, scores.shape, 1, layout=plgpu.Layout.WGMMA)
                else:
                    col = lax.broadcasted_iota(jnp.int32, scores.shape, 1)
                scores = jnp.where(col < limit, scores * scale_log2, -jnp.inf)
                m_new = jnp.maximum(m_i, scores.max(axis=1))
                p = jnp.exp2(scores - lax.broadcast_in_dim(m_new, scores.shape, [0]))
            else:
                m_new = jnp.maximum(m_i, scores.max(axis=1) * scale_log2)
                p = jnp.exp2(scores * scale_log2 - lax.broadcast_in_dim(m_new, scores.shape, [0]))
            alpha = jnp.exp2(m_i - m_new)
            return p.astype(dtype), m_new, l_i * alpha + p.sum(axis=1), alpha

        def rescaled(acc, alpha):
            return acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

        def run_blocks(step, carry):
            # Every key block in order, as runs with a static kind of mask; ``step(s, carry, limit)``.
            for p, j0, j1, mask in runs:
                if mask is None:
                    def run_step(j, c, p=p):
                        return step(part_start[p] + j, c, None)
                else:
                    n_valid = mask[1] if mask[0] == "static" else row_length(mask[1])

                    def run_step(j, c, p=p, n_valid=n_valid):
                        return step(part_start[p] + j, c, n_valid - j * bk)
                carry = lax.fori_loop(j0, j1, run_step, carry)
            return carry

        def k_block(slot):
            return plgpu.transpose_ref(k_smem.at[slot], (1, 0))

        def pingpong(qo_smem, m_i, l_i, acc):
            """The two warpgroups take turns: one multiplies while the other runs its softmax."""
            plgpu.barrier_wait(k_bar.at[0])
            # Offset the two warpgroups by half a step.
            pl.when(wg == 1)(take_turn)

            def step(s, carry, limit):
                acc, m_i, l_i = carry
                slot = lax.rem(s, depth)

                def qk_product(acc_ref):
                    plgpu.wgmma(acc_ref, qo_smem, k_block(slot))
                    take_turn()
                    return acc_ref[...]

                if interpret is None:
                    scores = pl.run_scoped(qk_product, plgpu.ACC((bq, bk), jnp.float32))
                else:  # the interpreter's wgmma takes no transposed operand: the same product from plain reads
                    scores = jnp.dot(qo_smem[...], k_smem[slot].T, preferred_element_type=jnp.float32)
                    take_turn()
                release(k_free, s, slot)
                p_lo, m_new, l_i, alpha = softmax(scores, m_i, l_i, limit)
                acc = rescaled(acc, alpha)
                acc, l_i, m_new, p_lo = lax.optimization_barrier((acc, l_i, m_new, p_lo))
                plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(v_bar.at[slot])
                plgpu.barrier_wait(turn)

                def pv_product(acc_ref):
                    plgpu.wgmma(acc_ref, p_lo, v_smem.at[slot])

                    @pl.when(s + 1 < n_steps)
                    def _():
                        plgpu.barrier_wait(k_bar.at[lax.rem(s + 1, depth)])

                if interpret is None:
                    acc = pl.run_state(pv_product)(plgpu.ACC.init(acc))
                else:  # GPU interpret mode has no run_state: the same product from plain reads
                    acc = acc + jnp.dot(p_lo, v_smem[slot], preferred_element_type=jnp.float32)

                    @pl.when(s + 1 < n_steps)
                    def _():
                        plgpu.barrier_wait(k_bar.at[lax.rem(s + 1, depth)])
                release(v_free, s, slot)
                return acc, m_new, l_i

            acc, m_i, l_i = run_blocks(step, (acc, m_i, l_i))
            pl.when(wg == 0)(take_turn)
            return acc, l_i

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            qo_smem = qo_smem2.at[wg]
            row0 = lax.axis_index("q_seq") * (2 * bq) + wg * bq
            plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(row0, bq), head], qo_smem, q_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])

            row_layout = plgpu.Layout.WGMMA.reduce(1)
            m_i = laid_out(jnp.full((bq,), -jnp.inf, jnp.float32), row_layout)
            l_i = laid_out(jnp.full((bq,), 0.0, jnp.float32), row_layout)
            acc = laid_out(jnp.full((bq, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)
            acc, l_i = pingpong(qo_smem, m_i, l_i, acc)

            acc = acc * lax.broadcast_in_dim(1.0 / l_i, acc.shape, [0])
            qo_smem[...] = acc.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[batch, pl.ds(row0, bq), head])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            kv_head = lax.div(head, group)
            for p, j0, j1, _ in runs:

                @pl.loop(j0, j1)
                def _(j, p=p):
                    s = part_start[p] + j
                    slot = lax.rem(s, depth)
                    blk = (batch, pl.ds(j * bk, bk), kv_head)

                    @pl.when(s >= depth)
                    def _():
                        plgpu.barrier_wait(k_free.at[slot])

                    plgpu.copy_gmem_to_smem(k_refs[p].at[blk], k_smem.at[slot], k_bar.at[slot])

                    @pl.when(s >= depth)
                    def _():
                        plgpu.barrier_wait(v_free.at[slot])

                    plgpu.copy_gmem_to_smem(v_refs[p].at[blk], v_smem.at[slot], v_bar.at[slot])

    def entry(*refs):
        swizzle = 128
        tile = swizzle // jnp.dtype(dtype).itemsize
        transforms = (plgpu.TilingTransform((8, tile)), plgpu.SwizzleTransform(swizzle))
        smem = (
            plgpu.SMEM((2, bq, d), dtype, transforms=transforms),
            plgpu.SMEM((depth, bk, d), dtype, transforms=transforms),
            plgpu.SMEM((depth, bk, d), dtype, transforms=transforms),
        )
        loaded = (
            plgpu.Barrier(num_barriers=depth),
            plgpu.Barrier(num_barriers=depth),
            plgpu.Barrier(num_barriers=2),
        )
        freed = (plgpu.Barrier(num_arrivals=2, num_barriers=depth),) * 2
        pl.run_scoped(
            lambda *scratch: body(*refs, scratch),
            smem,
            loaded,
            freed,
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    operands = [q, *ks, *vs] + ([dyn_lengths] if dyn_lengths is not None else [])
    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        # Query tiles slowest: the CTAs running at once are every head of both rows for one or two query tiles. At
        # the 720p last scale this runs 6 % faster than query tiles before rows (282 vs 300 ms, H200), and much
        # faster than the CTAs of one kv head together (339 ms): fewer CTAs read each key block at the same time.
        grid=(h, b, -(-lq // (2 * bq))),
        grid_names=("heads", "batch", "q_seq"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )(*operands)
