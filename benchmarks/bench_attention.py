"""Attention kernels at the sampler's largest calls (issue 6): cuDNN (``jax.nn.dot_product_attention``) against the
Pallas Mosaic GPU flash attention (``jax.experimental.pallas.ops.gpu.attention_mgpu``, Hopper only; its shared-memory
tiles are fp16, so it is timed on fp16 copies of the inputs).

Shapes: the 8B model's 32 query / 8 KV heads of 128, bf16, both guidance rows (batch 2), non-causal; the 480p 5 s
last scale (q 31,800 against 33,490 keys) and the 720p one (q 72,000 against 75,700 keys), the last 100 keys being
text of which the last 3 are padding. The raw kernel needs padded lengths (its times are on the padded shapes).
Prints TFLOP/s = 4·B·H·Lq·Lk·d / time and cuDNN's error against an fp32 computation on 64 queries.

    python benchmarks/bench_attention.py [--repeats 10] [--configs 64/128/2,64/64/2]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp


SHAPES = {"480p_last": (31_800, 33_490), "720p_last": (72_000, 75_700)}
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--configs", default="64/128/2,64/64/2,64/128/3,64/64/4,128/64/2",
                    help="raw Mosaic tunings block_q/block_kv/stages")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="which calls (default all)")
    args = ap.parse_args()
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print("| call | kernel | config | Lq x Lk | ms | TFLOP/s | max err vs fp32 (64 q) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.shapes.split(","):
        lq, lk = SHAPES[name]
        kq, kk, kv = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(kq, (ROWS, lq, HEADS, HEAD_DIM), jnp.bfloat16)
        k = jax.random.normal(kk, (ROWS, lk, KV_HEADS, HEAD_DIM), jnp.bfloat16)
        v = jax.random.normal(kv, (ROWS, lk, KV_HEADS, HEAD_DIM), jnp.bfloat16)
        text_valid = jnp.arange(TEXT)[None, :].repeat(ROWS, 0) < TEXT - TEXT_PAD
        valid = jnp.concatenate([jnp.ones((ROWS, lk - TEXT), bool), text_valid], axis=1)
        lengths = jnp.sum(valid, axis=1).astype(jnp.int32)
        flops = 4 * ROWS * HEADS * lq * lk * HEAD_DIM
        ref = exact(q[:, :64], k, v, valid)

        def err(o):
            return f"{float(jnp.max(jnp.abs(o[:, :64].astype(jnp.float32) - ref))):.2e}"

        cudnn = jax.jit(lambda q, k, v, n: jax.nn.dot_product_attention(
            q, k, v, key_value_seq_lengths=n, implementation="cudnn"))
        s = timed(cudnn, q, k, v, lengths, repeats=args.repeats)
        print(f"| {name} | cudnn (masked text) | | {lq} x {lk} | {1e3 * s:.1f} | {flops / s / 1e12:.0f} | "
              f"{err(cudnn(q, k, v, lengths))} |", flush=True)
        try:
            from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu
        except ImportError as e:
            print(f"# attention_mgpu unavailable: {e}")
            continue
        for spec in args.configs.split(","):
            block_q, block_kv, stages = (int(x) for x in spec.split("/"))
            pad_q, pad_k = -lq % (2 * block_q), -lk % block_kv
            qp = jnp.pad(q, ((0, 0), (0, pad_q), (0, 0), (0, 0))).astype(jnp.float16)
            kp = jnp.pad(k, ((0, 0), (0, pad_k), (0, 0), (0, 0))).astype(jnp.float16)
            vp = jnp.pad(v, ((0, 0), (0, pad_k), (0, 0), (0, 0))).astype(jnp.float16)
            cfg = mgpu.TuningConfig(block_q=block_q, block_kv=block_kv, max_concurrent_steps=stages)
            fn = jax.jit(lambda q, k, v, cfg=cfg: mgpu.attention(q, k, v, cfg))
            try:
                s = timed(fn, qp, kp, vp, repeats=args.repeats)
            except Exception as e:  # noqa: BLE001 - report configurations the kernel refuses
                print(f"| {name} | mosaic raw fp16 | {spec} | | failed: {str(e).splitlines()[0][:120]} | | |")
                continue
            fl = 4 * ROWS * HEADS * qp.shape[1] * kp.shape[1] * HEAD_DIM
            print(f"| {name} | mosaic raw fp16 (padded, unmasked) | {spec} | {qp.shape[1]} x {kp.shape[1]} | "
                  f"{1e3 * s:.1f} | {fl / s / 1e12:.0f} | |", flush=True)


if __name__ == "__main__":
    main()
