"""What limits the Mosaic GPU attention kernel: times variants of ``infstar_jax/transformer/flash_mgpu.py`` that each
remove one part of the work, made by substituting its source text (a diagnostic: the variants' outputs are wrong by
design, and the script stops if the source no longer contains the text it edits).

  base       the kernel as it is
  sameblock  every K/V copy reads the first block of the first row and head (all L2 hits, no HBM traffic)
  noexp      no exp2 in the softmax (the probabilities are the shifted scores)
  norescale  the output accumulator is never rescaled by the running max

    PYTHONPATH=. python benchmarks/probe_flash_limits.py [--variants base,sameblock,noexp,norescale]
        [--shape 720p] [--tiling 64/192/2]

Shapes: the sampler's last scale at 720p (72,000 queries, 3,700 prefix keys) or 480p (31,800, 1,690), 2 rows, 32/8
heads of 128, bf16. Hopper only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types

import jax
import jax.numpy as jnp

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "infstar_jax", "transformer", "flash_mgpu.py")
_SOFTMAX_EXP = "p = jnp.exp2(scores * scale_log2 - lax.broadcast_in_dim(m_new, scores.shape, [0]))"
VARIANTS = {
    "base": [],
    "sameblock": [("blk = (batch, pl.ds(j * bk, bk), kv_head)", "blk = (0, pl.ds(0, bk), 0)")],
    "noexp": [(_SOFTMAX_EXP, _SOFTMAX_EXP.replace("jnp.exp2(", "(", 1))],
    "norescale": [("acc = rescaled(acc, alpha)", "pass")],
}
SHAPES = {"720p": (72_000, 3_700), "480p": (31_800, 1_690)}


def load(name: str):
    src = open(SOURCE).read()
    for old, new in VARIANTS[name]:
        if old not in src:
            raise SystemExit(f"variant {name}: the kernel source no longer contains {old!r}")
        src = src.replace(old, new)
    mod = types.ModuleType(f"flash_variant_{name}")
    sys.modules[mod.__name__] = mod  # (dataclasses look their module up)
    exec(compile(src, mod.__name__, "exec"), mod.__dict__)
    return mod


def timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / repeats


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--shape", choices=sorted(SHAPES), default="720p")
    ap.add_argument("--tiling", default="64/192/2")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    lq, lp = SHAPES[args.shape]
    lp8 = -(-lp // 8) * 8
    ks = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(ks[0], (2, lq, 32, 128), jnp.bfloat16)
    k, v = (jax.random.normal(kk, (2, lq, 8, 128), jnp.bfloat16) for kk in ks[1:3])
    pk, pv = (jax.random.normal(kk, (2, lp8, 8, 128), jnp.bfloat16) for kk in ks[3:5])
    flops = 4 * 2 * 32 * lq * (lq + lp) * 128
    print(f"# {args.shape} last scale, tiling {args.tiling}, {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print("| variant | ms | TFLOP/s |")
    print("|---|---|---|")
    for name in args.variants.split(","):
        mod = load(name)
        tiling = mod.Tiling.parse(args.tiling)
        fn = jax.jit(lambda q, k, v, pk, pv, m=mod, t=tiling: m.flash_attention(
            q, [k, pk], [v, pv], [lq, lp - 3], tiling=t))
        s = timed(fn, q, k, v, pk, pv, repeats=args.repeats)
        print(f"| {name} | {s * 1e3:.2f} | {flops / s / 1e12:.0f} |", flush=True)


if __name__ == "__main__":
    main()
