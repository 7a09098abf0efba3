"""Times the video VAE with the released widths and random weights (random weights give the true speed).

Cases (issue 4; PyTorch reference on one H200, bf16 autocast, uint8 conversion included: 480p decode 0.875 s / 28.1 GiB,
720p decode 1.95 s / 42.1 GiB):

  decode480  latent 21x30x53 (64 ch) -> 81x480x848 uint8 frames
  decode720  latent 21x45x80 (64 ch) -> 81x720x1280 uint8 frames
  encode480  81x480x848 pixels -> latent 21x30x53 (posterior sampled with a key)

Each case runs chunked (the reference's chunks unless ``--latent-frames-per-chunk`` / ``--frames-per-chunk`` say
otherwise), once to compile, then ``--repeats`` timed runs ending in ``block_until_ready``; the reported time is the
median. Peak device memory is ``memory_stats()["peak_bytes_in_use"]`` of device 0; each case runs in its own process
so that peaks do not carry over. Prints one markdown table row per case.

    python benchmarks/bench_vae.py                      # all three cases, bf16, on the default device
    python benchmarks/bench_vae.py --case decode720 --latent-frames-per-chunk 4
    python benchmarks/bench_vae.py --small              # CPU smoke check with tiny widths and sizes
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CASES = {
    # name: (kind, full-size shape, --small shape); decode shapes are latents [B,t,h,w,64], encode shapes pixels.
    "decode480": ("decode", (1, 21, 30, 53, 64), (1, 5, 2, 3, 64)),
    "decode720": ("decode", (1, 21, 45, 80, 64), (1, 5, 3, 4, 64)),
    "encode480": ("encode", (1, 81, 480, 848, 3), (1, 17, 32, 48, 3)),
}
HEADER = (
    "| case | input -> output | dtype | chunks | seconds (median) | peak device memory | device |\n"
    "|---|---|---|---|---|---|---|"
)


def run_case(args) -> str:
    import jax
    import jax.numpy as jnp

    from infstar_jax.tokenizer.vae import ChunkedVAE, VAEConfig, VideoVAE, init_params

    kind, full, small = CASES[args.case]
    shape = small if args.small else full
    widths = (8, 16, 32, 32, 32) if args.small else (96, 192, 384, 384, 384)
    dtype = {"bf16": jnp.bfloat16, "fp32": jnp.float32}[args.dtype]
    model = VideoVAE(VAEConfig(block_out_channels=widths), dtype=dtype)
    variables = jax.device_put(init_params(model, seed=0))
    runner = ChunkedVAE(
        model, frames_per_chunk=args.frames_per_chunk, latent_frames_per_chunk=args.latent_frames_per_chunk
    )
    key = jax.random.key(0)
    if kind == "decode":
        x = jax.random.normal(key, shape, jnp.float32)
        fn = lambda: runner.decode(variables, x, frames=True)  # noqa: E731
        chunks = f"{runner.latent_frames_per_chunk} latent frames"
    else:
        x = jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0)
        fn = lambda: runner.encode(variables, x, key=jax.random.key(1))  # noqa: E731
        chunks = f"{runner.frames_per_chunk} frames"
    jax.block_until_ready(x)
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    peak_s = f"{peak / 2**30:.1f} GiB" if peak is not None else "n/a"
    io = f"{'x'.join(map(str, shape[1:-1]))} -> {'x'.join(map(str, out.shape[1:-1]))} ({out.dtype})"
    print(f"# {args.case}: first call (compile + run) {compile_s:.1f} s; runs {[round(t, 3) for t in times]}", file=sys.stderr)
    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()}, jax {jax.__version__})"
    return f"| {args.case} | {io} | {args.dtype} | {chunks} | {statistics.median(times):.3f} | {peak_s} | {device} |"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=sorted(CASES), action="append", help="case(s) to run (default: all)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="compute dtype (params stay fp32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--latent-frames-per-chunk", type=int, default=2, help="decoder chunk length (even)")
    p.add_argument("--frames-per-chunk", type=int, default=None, help="encoder chunk length (multiple of 4)")
    p.add_argument("--small", action="store_true", help="tiny widths and sizes: a CPU smoke check")
    args = p.parse_args(argv)
    cases = args.case or sorted(CASES)
    if len(cases) == 1:
        args.case = cases[0]
        print(run_case(args))
        return 0
    print(HEADER)
    rc = 0
    for case in cases:
        # A fresh process per case: peak memory is per process lifetime.
        cmd = [sys.executable, __file__, "--case", case, "--dtype", args.dtype, "--repeats", str(args.repeats),
               "--latent-frames-per-chunk", str(args.latent_frames_per_chunk)]
        if args.frames_per_chunk:
            cmd += ["--frames-per-chunk", str(args.frames_per_chunk)]
        if args.small:
            cmd.append("--small")
        res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        rc |= res.returncode
        print(res.stdout.strip() if res.returncode == 0 else f"| {case} | failed (exit {res.returncode}) | | | | | |")
    return rc


if __name__ == "__main__":
    sys.exit(main())
