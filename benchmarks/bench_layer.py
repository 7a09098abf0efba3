"""Where one transformer layer's time goes at a sampler step (issue 6): the sampler's per-layer program
(``sampler._layer``) on the 8B architecture in the ``infer`` precision, both guidance rows, a step of ``--tokens``
tokens seeing a cached prefix of ``--prefix`` tokens and 100 text keys. Prints the median time of the whole layer,
each kernel of one traced call in order (device time), and the block matmuls alone, as the layer issues them and
with the projections that read the same input fused into one matmul (Q/K/V, as the sampler runs it, and gate/up).

    PYTHONPATH=. python benchmarks/bench_layer.py --tokens 72000 --prefix 3600   # 720p last scale
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kernel_sequence(fn, *args) -> list[tuple[str, float]]:
    """(kernel name, device ms) of one call, in launch order."""
    from profile_summary import gpu_lines, is_ops_line

    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        jax.block_until_ready(fn(*args))
        jax.profiler.stop_trace()
        return [(e.name, e.duration_ns / 1e6) for _, name, events in gpu_lines(d) if is_ops_line(name)
                for e in sorted(events, key=lambda e: e.start_ns)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=72_000)
    ap.add_argument("--prefix", type=int, default=3_600)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from infstar_jax.sampling.sampler import _layer
    from infstar_jax.transformer import rope
    from infstar_jax.transformer.config import architecture
    from infstar_jax.transformer.model import fuse_qkv, init_params

    cfg = architecture("infinity_qwen8b").with_precision("infer")
    one = cfg.replace(depth=1)
    blocks = jax.jit(lambda k: nn.meta.unbox(init_params(one, k)["params"])["blocks"])(jax.random.key(0))
    lp = fuse_qkv(jax.tree.map(lambda x: x[0], blocks))  # the sampler's per-layer layout
    rows, n, c = 2, args.tokens, cfg.embed_dim
    ks = jax.random.split(jax.random.key(1), 4)
    h = jax.random.normal(ks[0], (rows, n, c), jnp.bfloat16)
    pos = jnp.broadcast_to(jnp.stack([jnp.arange(n) % 7, jnp.arange(n) % 5, jnp.arange(n) % 3, jnp.zeros(n, int)],
                                     -1), (rows, n, 4))
    cos, sin = rope.cos_sin(pos, cfg.head_dim, cfg.rope_base)
    lpre = args.prefix + 100
    pk = jax.random.normal(ks[1], (rows, lpre, cfg.num_kv_heads, cfg.head_dim), jnp.bfloat16)
    pv = jax.random.normal(ks[2], (rows, lpre, cfg.num_kv_heads, cfg.head_dim), jnp.bfloat16)
    pvalid = jnp.arange(lpre)[None, :] < lpre - 3
    pvalid = jnp.broadcast_to(pvalid, (rows, lpre))

    def layer(h):  # a fresh copy each call: the program donates its input
        return _layer(lp, h, cos, sin, None, pk, pv, pvalid, cfg=cfg, layout=None)

    copy = jax.jit(lambda x: x + 0)
    t_layer = timed(lambda: layer(copy(h)), repeats=args.repeats) - timed(lambda: copy(h), repeats=args.repeats)
    print(f"# layer at {n:,} tokens x {rows} rows, prefix {lpre}: {t_layer * 1e3:.2f} ms per call "
          f"({jax.devices()[0].device_kind})", flush=True)
    seq = kernel_sequence(lambda: layer(copy(h)))
    print("| # | kernel | ms |")
    print("|---|---|---|")
    for i, (name, ms) in enumerate(seq):
        print(f"| {i} | {name[:70]} | {ms:.3f} |")
    print(f"# traced kernels sum to {sum(ms for _, ms in seq):.2f} ms", flush=True)

    # The block matmuls alone, bf16 in and out (the Linear layers' dot_general), separate and fused.
    x = jax.random.normal(ks[3], (rows * n, c), jnp.bfloat16)
    m = cfg.mlp_dim
    hq, hkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {"q": (c, hq), "k/v": (c, hkv), "o": (hq, c), "gate/up": (c, m), "down": (m, c),
              "qkv fused": (c, hq + 2 * hkv), "gate+up fused": (c, 2 * m)}
    mm = jax.jit(lambda a, w: jnp.dot(a, w, preferred_element_type=jnp.bfloat16))
    print("| matmul | [K, N] | ms | TFLOP/s |")
    print("|---|---|---|---|")
    for name, (kdim, ndim) in shapes.items():
        a = x if kdim == c else jax.random.normal(ks[3], (rows * n, kdim), jnp.bfloat16)
        w = jax.random.normal(ks[2], (kdim, ndim), jnp.bfloat16) * 0.02
        t = timed(mm, a, w, repeats=args.repeats)
        print(f"| {name} | [{kdim}, {ndim}] | {t * 1e3:.2f} | {2 * rows * n * kdim * ndim / t / 1e12:.0f} |", flush=True)


if __name__ == "__main__":
    main()
