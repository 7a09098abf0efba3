"""Attention kernels at the sampler's largest calls (issue 6): cuDNN (``jax.nn.dot_product_attention``) against the
Pallas Mosaic GPU flash attention (``jax.experimental.pallas.ops.gpu.attention_mgpu``, Hopper only).

Shapes: the 8B model's 32 query / 8 KV heads of 128, bf16, both guidance rows (batch 2), non-causal; the 480p 5 s
last scale (q 31,800 against 33,490 keys) and the 720p one (q 72,000 against 75,700 keys). The Mosaic kernel needs
the key length to be a multiple of its key block, so it is timed on keys padded up to one (an upper bound of what a
masked version would cost). Prints TFLOP/s = 4·B·H·Lq·Lk·d / time.

    python benchmarks/bench_attention.py [--repeats 10]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

SHAPES = {"480p_last": (31_800, 33_490), "720p_last": (72_000, 75_700)}
HEADS, KV_HEADS, HEAD_DIM, ROWS = 32, 8, 128, 2


def timed(fn, *args, repeats: int) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / repeats


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print("| call | kernel | config | Lq x Lk | ms | TFLOP/s |")
    print("|---|---|---|---|---|---|")
    for name, (lq, lk) in SHAPES.items():
        kq, kk, kv = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(kq, (ROWS, lq, HEADS, HEAD_DIM), jnp.bfloat16)
        k = jax.random.normal(kk, (ROWS, lk, KV_HEADS, HEAD_DIM), jnp.bfloat16)
        v = jax.random.normal(kv, (ROWS, lk, KV_HEADS, HEAD_DIM), jnp.bfloat16)
        flops = 4 * ROWS * HEADS * lq * lk * HEAD_DIM
        cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
        s = timed(cudnn, q, k, v, repeats=args.repeats)
        print(f"| {name} | cudnn | | {lq} x {lk} | {1e3 * s:.1f} | {flops / s / 1e12:.0f} |", flush=True)
        try:
            from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu
        except ImportError as e:
            print(f"# attention_mgpu unavailable: {e}")
            continue
        for block_q, block_kv, stages in ((64, 64, 2), (64, 128, 2), (64, 128, 3), (64, 64, 4), (128, 64, 2)):
            pad_q = -lq % (2 * block_q)
            pad_k = -lk % block_kv
            qp = jnp.pad(q, ((0, 0), (0, pad_q), (0, 0), (0, 0)))
            kp = jnp.pad(k, ((0, 0), (0, pad_k), (0, 0), (0, 0)))
            vp = jnp.pad(v, ((0, 0), (0, pad_k), (0, 0), (0, 0)))
            cfg = mgpu.TuningConfig(block_q=block_q, block_kv=block_kv, max_concurrent_steps=stages)
            fn = jax.jit(lambda q, k, v, cfg=cfg: mgpu.attention(q, k, v, cfg))
            try:
                s = timed(fn, qp, kp, vp, repeats=args.repeats)
            except Exception as e:  # noqa: BLE001 - report configurations the kernel refuses
                print(f"| {name} | mosaic | {block_q}/{block_kv}/{stages} | | failed: {str(e).splitlines()[0][:80]} | |")
                continue
            fl = 4 * ROWS * HEADS * qp.shape[1] * kp.shape[1] * HEAD_DIM
            print(f"| {name} | mosaic | {block_q}/{block_kv}/{stages} | {qp.shape[1]} x {kp.shape[1]} | "
                  f"{1e3 * s:.1f} | {fl / s / 1e12:.0f} |", flush=True)
        # agreement of the two on the unpadded part (same keys: pad K so both see identical key sets)
        if lk % 64 == 0:
            ref = cudnn(q, k, v)
            got = mgpu.attention(q, k, v, mgpu.TuningConfig(block_q=64, block_kv=64, max_concurrent_steps=2))
            print(f"# {name}: max |cudnn - mosaic| = {float(jnp.max(jnp.abs(ref.astype(jnp.float32) - got.astype(jnp.float32)))):.3g}")


if __name__ == "__main__":
    main()
