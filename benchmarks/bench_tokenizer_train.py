"""Times one tokenizer train step (issue 9) with the released widths on 17-frame 480p clips, random weights and data.

One step = encode (posterior sampled) -> multi-scale BSQ with straight-through gradients over the released 480p
schedule for 17 frames (14 scales per clip, image + one 4-frame clip, 81 quantisation steps) -> decode -> L1 loss
(x4) + BSQ losses -> backward -> Adam update of all tokenizer params; optionally the patch discriminator's update too
(``--disc``) and SQD (``--sqd``: the step always runs every scale, so it changes no timing). The whole clip runs as
one sequence (no chunking).

Each case runs in its own process (clean peak memory): one call to compile, then ``--repeats`` timed steps ending in
``block_until_ready``; the median is reported. Peak device memory is ``memory_stats()["peak_bytes_in_use"]`` of
device 0. Prints one markdown table row per case.

    python benchmarks/bench_tokenizer_train.py                          # fp32 and bf16, batch 1, 17x480x848
    python benchmarks/bench_tokenizer_train.py --dtype bf16 --remat --batch 2
    python benchmarks/bench_tokenizer_train.py --small                  # CPU smoke check (tiny widths and sizes)
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import sys
import time

HEADER = (
    "| clip (B x T x H x W) | dtype | remat | discriminator | step seconds (median) | peak device memory | "
    "compile + first step (s) | device |\n|---|---|---|---|---|---|---|---|"
)


def run_case(args) -> str:
    import jax
    import jax.numpy as jnp
    import optax

    from infstar_jax.tokenizer import discriminator as disc_lib
    from infstar_jax.tokenizer import evaluate as ev
    from infstar_jax.tokenizer import train as tt
    from infstar_jax.tokenizer.vae import VAEConfig, VideoVAE, init_params

    frames, (h, w) = (17, (32, 64)) if args.small else (args.frames, (480, 848))
    widths = (8, 16, 32, 32, 32) if args.small else (96, 192, 384, 384, 384)
    dtype = {"bf16": jnp.bfloat16, "fp32": jnp.float32}[args.dtype]
    model = VideoVAE(VAEConfig(block_out_channels=widths), dtype=dtype)
    quant = ev.QuantSettings(detail_scale_min_tokens=4) if args.small else ev.QuantSettings()
    sched, plan = ev.plan_for(frames, h, w, quant)
    disc = None
    loss = tt.LossConfig(lfq_weight=0.1)
    if args.disc:
        disc = disc_lib.PatchDiscriminator(disc_lib.DiscConfig(channels=16 if args.small else 64), dtype=dtype)
        loss = tt.LossConfig(lfq_weight=0.1, image_disc_weight=1.0)
    options = tt.StepOptions(seed=0, loss=loss, sqd=tt.SQDConfig(0.5 if args.sqd else 0.0), remat=args.remat)
    tx = tt.make_optimizer(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-4, b2=0.95)), (),
                           optax.adam(1e-4) if disc is not None else None)
    params = {"vae": init_params(model, seed=0)["params"]}
    if disc is not None:
        params["disc"] = disc.init(jax.random.key(1), jnp.zeros((1, h, w, 3)))["params"]
    state = jax.device_put(tt.init_state(params, tx))
    step = jax.jit(functools.partial(tt.train_step, models=tt.Models(model, disc), plan=plan, tx=tx,
                                     schedule=optax.constant_schedule(1e-4), options=options), donate_argnums=(0,))
    video = jax.random.uniform(jax.random.key(2), (args.batch, frames, h, w, 3), jnp.float32, -1.0, 1.0)
    batch = {"video": video}
    jax.block_until_ready(video)
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready((state, m))
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t0)
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    peak_s = f"{peak / 2**30:.1f} GiB" if peak is not None else "n/a"
    print(f"# {args.dtype} batch {args.batch}: first call {first:.1f} s; runs {[round(t, 3) for t in times]}; "
          f"loss {float(m['loss']):.4f}; {sched.scales_per_clip} scales per clip, {plan.num_steps} quantisation "
          f"steps", file=sys.stderr)
    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()}, jax {jax.__version__})"
    return (f"| {args.batch} x {frames} x {h} x {w} | {args.dtype} | {'yes' if args.remat else 'no'} | "
            f"{'yes' if args.disc else 'no'} | {statistics.median(times):.3f} | {peak_s} | {first:.1f} | {device} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=("bf16", "fp32"), action="append", help="compute dtype(s) (default both)")
    p.add_argument("--batch", type=int, default=1, help="clips per step")
    p.add_argument("--frames", type=int, default=17, help="frames per clip (4k+1)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--remat", action="store_true", help="recompute encoder/decoder activations in the backward")
    p.add_argument("--disc", action="store_true", help="add the patch discriminator and its update")
    p.add_argument("--sqd", action="store_true", help="stochastic quantizer depth on (same compute)")
    p.add_argument("--small", action="store_true", help="tiny widths and sizes: a CPU smoke check")
    args = p.parse_args(argv)
    dtypes = args.dtype or ["fp32", "bf16"]
    if len(dtypes) == 1:
        args.dtype = dtypes[0]
        print(run_case(args))
        return 0
    print(HEADER)
    rc = 0
    for dtype in dtypes:
        # A fresh process per case: peak memory is per process lifetime.
        cmd = [sys.executable, __file__, "--dtype", dtype, "--batch", str(args.batch), "--frames", str(args.frames),
               "--repeats", str(args.repeats)]
        cmd += [f"--{flag}" for flag in ("remat", "disc", "sqd", "small") if getattr(args, flag)]
        res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        rc |= res.returncode
        print(res.stdout.strip() if res.returncode == 0 else f"| {args.batch} x {args.frames} | {dtype} | failed "
              f"(exit {res.returncode}) | | | | | |")
    return rc


if __name__ == "__main__":
    sys.exit(main())
