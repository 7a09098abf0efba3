"""The sampler's attention at its largest calls (issue 6): cuDNN over the concatenated keys (``jax.nn.dot_product_
attention``, as the sampler used before) against our Mosaic GPU kernel reading the current and the cached keys in place
(``infstar_jax.transformer.flash_mgpu`` through ``attention.prefix_attention``). Hopper only.

Shapes: the 8B model's 32 query / 8 KV heads of 128, bf16, both guidance rows (batch 2), non-causal; the current
scale's tokens see themselves and a prefix (the previous clip's last scale, then 100 text keys of which the last 3 are
padding): 480p 5 s last scale (31,800 tokens, prefix 1,590 + 100), 720p last scale (72,000, prefix 3,600 + 100), and
a mid-size scale. Times include each route's glue (concatenation, or padding to the kernel's tiles); TFLOP/s =
4·B·H·Lq·Lk·d / time. The error column is the max abs difference from an fp32 computation on the first and last 64 queries.

``--check-recompile`` checks that lowering the kernel leaves JAX's tracing context alone (earlier programs must not
compile again).

    PYTHONPATH=. python benchmarks/bench_attention.py [--repeats 10] [--tilings 64/128/2,64/64/3]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from infstar_jax.transformer import attention, flash_mgpu

# name: (current tokens, referenced-scale prefix tokens)
SHAPES = {"480p_last": (31_800, 1_590), "720p_last": (72_000, 3_600), "mid": (8_160, 1_590), "small": (960, 1_590)}
HEADS, KV_HEADS, HEAD_DIM, ROWS, TEXT, TEXT_PAD = 32, 8, 128, 2, 100, 3


def timed(fn, *args, repeats: int) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / repeats


def exact(q, k, v, valid):
    """fp32 attention of the given queries (the error reference)."""
    g = HEADS // KV_HEADS
    qf = q.astype(jnp.float32).reshape(q.shape[0], q.shape[1], KV_HEADS, g, HEAD_DIM)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qf, k.astype(jnp.float32), precision="highest") * HEAD_DIM**-0.5
    s = jnp.where(valid[:, None, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(jnp.float32), precision="highest")
    return o.reshape(q.shape)


def check_recompile():
    from jax._src import config as jax_config

    x = jnp.ones((8,))
    f = jax.jit(lambda x: x * 2 + 1)
    f(x).block_until_ready()
    before = jax_config.trace_context()
    q = jnp.ones((1, 128, 2, 128), jnp.bfloat16)
    k = jnp.ones((1, 128, 1, 128), jnp.bfloat16)
    jax.block_until_ready(jax.jit(flash_mgpu.flash_attention)(q, [k], [k]))
    after = jax_config.trace_context()
    print(f"# trace context changed by the kernel: {before != after}")
    if before != after:
        names = getattr(jax_config, "trace_context_names", None)
        try:
            names = names() if names else None
        except NotImplementedError:
            names = None
        print(f"# names: {names}")
        print(f"# before: {before}")
        print(f"# after:  {after}")
    compiles = []
    import logging

    class Catch(logging.Handler):
        def emit(self, record):
            if "Compiling" in record.getMessage() or "Finished XLA compilation" in record.getMessage():
                compiles.append(record.getMessage()[:100])

    handler = Catch()
    logging.getLogger("jax").addHandler(handler)
    with jax.log_compiles(True):
        f(x).block_until_ready()
    logging.getLogger("jax").removeHandler(handler)
    print(f"# earlier program compiled again after the kernel: {bool(compiles)} {compiles[:2]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--tilings", default="", help="also time the raw kernel with these block_q/block_kv/stages")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="which calls (default all)")
    ap.add_argument("--check-recompile", action="store_true")
    ap.add_argument("--routes", default="cudnn,mosaic", help="prefix_attention routes to time (mosaic uses "
                    "INFSTAR_FLASH_TILING or the default tiling)")
    args = ap.parse_args()
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}")
    if args.check_recompile:
        check_recompile()
    print("| call | route | Lq x Lk | ms | TFLOP/s | max err vs fp32 (first and last 64 q) |")
    print("|---|---|---|---|---|---|")
    for name in args.shapes.split(","):
        lq, lref = SHAPES[name]
        lp = lref + TEXT
        ks = jax.random.split(jax.random.key(0), 5)
        q = jax.random.normal(ks[0], (ROWS, lq, HEADS, HEAD_DIM), jnp.bfloat16)
        k = jax.random.normal(ks[1], (ROWS, lq, KV_HEADS, HEAD_DIM), jnp.bfloat16)
        v = jax.random.normal(ks[2], (ROWS, lq, KV_HEADS, HEAD_DIM), jnp.bfloat16)
        pk = jax.random.normal(ks[3], (ROWS, lp, KV_HEADS, HEAD_DIM), jnp.bfloat16)
        pv = jax.random.normal(ks[4], (ROWS, lp, KV_HEADS, HEAD_DIM), jnp.bfloat16)
        pvalid = jnp.broadcast_to(jnp.arange(lp) < lp - TEXT_PAD, (ROWS, lp))
        lk = lq + lp
        flops = 4 * ROWS * HEADS * lq * lk * HEAD_DIM
        rows = jnp.concatenate([jnp.arange(64), jnp.arange(lq - 64, lq)])  # first and last queries (partial tile)
        ref = exact(q[:, rows], jnp.concatenate([k, pk], 1), jnp.concatenate([v, pv], 1),
                    jnp.concatenate([jnp.ones((ROWS, lq), bool), pvalid], 1))

        def err(o):
            return f"{float(jnp.max(jnp.abs(o[:, rows].astype(jnp.float32) - ref))):.2e}"

        for route in args.routes.split(","):
            fn = jax.jit(lambda *a, r=route: attention.prefix_attention(*a, maskable_tail=512, implementation=r))
            s = timed(fn, q, k, v, pk, pv, pvalid, repeats=args.repeats)
            print(f"| {name} | {route} | {lq} x {lk} | {1e3 * s:.2f} | {flops / s / 1e12:.0f} | "
                  f"{err(fn(q, k, v, pk, pv, pvalid))} |", flush=True)
        for spec in filter(None, args.tilings.split(",")):
            tiling = flash_mgpu.Tiling.parse(spec)
            lp8 = -(-lp // 8) * 8  # the kernel's TMA needs lengths in multiples of 8
            pk8, pv8 = (jnp.pad(x, ((0, 0), (0, lp8 - lp), (0, 0), (0, 0))) for x in (pk, pv))
            fn = jax.jit(lambda q, k, v, pk, pv, t=tiling: flash_mgpu.flash_attention(
                q, [k, pk], [v, pv], [lq, lp - TEXT_PAD], tiling=t))
            try:
                s = timed(fn, q, k, v, pk8, pv8, repeats=args.repeats)
            except Exception as e:  # noqa: BLE001 - report tilings the kernel refuses
                print(f"| {name} | raw {spec} | | failed: {str(e).splitlines()[0][:120]} | | |")
                continue
            print(f"| {name} | raw kernel {spec} (text padding masked statically) | {lq} x {lk} | "
                  f"{1e3 * s:.2f} | {flops / s / 1e12:.0f} | {err(fn(q, k, v, pk8, pv8))} |", flush=True)


if __name__ == "__main__":
    main()
