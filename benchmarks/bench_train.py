"""Train-step time, tokens/s and MFU of the transformer trainer at the released 480p 5 s packed lengths.

    python benchmarks/bench_train.py                                   # infinity_qwen2_2b, all devices on fsdp
    python benchmarks/bench_train.py --model infinity_qwen8b --mesh fsdp=2   # 8B, FSDP over 2 GPUs
    python benchmarks/bench_train.py --small                           # tiny model and schedule (CPU smoke run)

For each var-len outcome of the released 480p 5 s 16:9 schedule (SPEC §7.3: 3,899 / 7,919 / 17,919 / 29,439 /
38,559 / 39,719 visual tokens) plus ``--text`` text tokens (default 256), padded to a multiple of 128, it times the
real train step (self-corrected tokenisation of a synthetic latent, packed forward/backward with block-sparse
attention, clipping, AdamW; bf16 compute with fp32 master weights, ``--remat``) with random weights, one example per
device (``--rows-per-device``). Then the probability-weighted mix with the released outcome probabilities
(40/30/20/6/3/1). MFU = (6·params·tokens + 12·nonzero 128-tiles·128²·width·depth) / step time / (peak · devices)
(``training/metrics.py``), recomputation not counted. Prints markdown rows.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402


from infstar_jax import parallel  # noqa: E402
from infstar_jax.training import batching, metrics, state as state_lib, step as step_lib  # noqa: E402
from infstar_jax.transformer.config import TransformerConfig, architecture  # noqa: E402
from infstar_jax.transformer.model import init_params  # noqa: E402

TEMPLATE_16_9 = 0.562
LATENT_FRAMES_5S = 21


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="infinity_qwen2_2b", help="registered architecture (default infinity_qwen2_2b)")
    p.add_argument("--mesh", default="fsdp=-1", help="mesh sizes, e.g. fsdp=2 or data=2,fsdp=4 (default fsdp=-1)")
    p.add_argument("--rows-per-device", type=int, default=1, help="examples per device per step (default 1)")
    p.add_argument("--remat", default="full", help="remat policy (default full, as the release)")
    p.add_argument("--remat-by-length", default="",
                   help="remat policy per packed length, e.g. 20000:none (longer steps: --remat)")
    p.add_argument("--precision", default="train", help="precision mode (default train: bf16 compute, fp32 weights)")
    p.add_argument("--text", type=int, default=256, help="text tokens per example (default 256)")
    p.add_argument("--lengths", default="all", help="outcome indices to run, e.g. 0,2,5 (default all)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per length (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation (default 2)")
    p.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s per device (default: by device kind)")
    p.add_argument("--small", action="store_true", help="tiny model and schedule: a CPU smoke run")
    p.add_argument("--profile", metavar="DIR", help="trace the timed steps of the first length into DIR and print "
                   "the per-op summary (benchmarks/profile_summary.py)")
    return p.parse_args(argv)


def mesh_shape(text: str) -> dict[str, int]:
    out = {}
    for part in text.split(","):
        name, sep, size = part.partition("=")
        if not sep:
            raise SystemExit(f"--mesh expects axis=size pairs, got {text!r}")
        out[name.strip()] = int(size)
    return out


def setup(args):
    """``(model config, packing options, schedule, outcomes, probabilities)``."""
    if args.small:
        cfg = TransformerConfig(depth=2, embed_dim=128, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=384,
                                text_dim=64, text_maxlen=64)
        opts = batching.PackingOptions(num_scales=4, image_rep=(3, 3, 3, 3), video_rep=(3, 3, 2, 1),
                                       semantic_scales=2, detail_scale_min_tokens=9, var_len=True,
                                       var_len_outcomes=((0, 1, 2, 3), tuple(range(8))), var_len_prob=(1, 1),
                                       pad_to_multiple=128, text_dim=64, text_maxlen=64)
        sched = batching.resolve_schedule(opts, 1.0, 5)
        args.text = min(args.text, 32)
    else:
        cfg = architecture(args.model)
        opts = batching.PackingOptions(text_dim=cfg.text_dim, text_maxlen=cfg.text_maxlen)
        sched = batching.resolve_schedule(opts, TEMPLATE_16_9, LATENT_FRAMES_5S)
    cfg = cfg.with_precision(args.precision).replace(remat=args.remat)
    outs, probs = batching.outcomes(opts, sched)
    return cfg, opts, sched, outs, probs


def synthetic_batch(shape, opts, text_len: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(shape.rows):
        latent = rng.normal(size=shape.latent_shape).astype(np.float32)
        text = rng.normal(size=(text_len, opts.text_dim)).astype(np.float32)
        rows.append(batching.row_arrays(shape, latent, text, rng, opts))
    return batching.stack_rows(rows)


def peak_memory_gib() -> float | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg, opts, sched, outs, probs = setup(args)
    mesh = parallel.make_mesh(mesh_shape(args.mesh))
    n_dev = mesh.devices.size
    rows = n_dev * args.rows_per_device
    peak = (args.peak_tflops * 1e12 if args.peak_tflops else metrics.peak_flops(jax.devices()[0].device_kind))
    chosen = range(len(outs)) if args.lengths == "all" else [int(i) for i in args.lengths.split(",")]
    label = "small" if args.small else args.model
    print(f"# {label}: {cfg.num_params() / 1e6:,.1f} M params, {n_dev} x "
          f"{jax.devices()[0].device_kind}, mesh {dict(mesh.shape)}, {rows} rows/step, precision {args.precision}, "
          f"remat {args.remat}{' (' + args.remat_by_length + ')' if args.remat_by_length else ''}, text {args.text}")
    print(f"# command: python {' '.join(sys.argv)}")
    print("| model | devices | visual tokens | packed tokens | step s | tokens/s | MFU | compile s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    tx, schedule = state_lib.optimizer_from_config(dict(lr=4e-5, steps=10**6))
    results = {}
    with jax.set_mesh(mesh):
        state, shardings = state_lib.create_sharded(lambda: init_params(cfg, jax.random.key(0))["params"], tx, mesh)
        train = step_lib.TrainStep(cfg, tx, schedule, step_lib.StepOptions(seed=0), mesh, shardings,
                                   remat_by_length=step_lib.parse_remat_by_length(args.remat_by_length))
        for i in chosen:
            shape = batching.step_shape(opts, sched, outs[i], args.text, rows)
            host = synthetic_batch(shape, opts, args.text, seed=i)
            batch = {k: jax.device_put(v, train.batch_sharding) for k, v in step_lib.device_arrays(host).items()}
            tokens, flops = metrics.batch_flops(cfg, shape, [args.text] * rows)
            try:
                t0 = time.perf_counter()
                state, m = train(state, shape, batch)
                jax.block_until_ready(m)
                compile_s = time.perf_counter() - t0
                for _ in range(args.warmup):
                    state, m = train(state, shape, batch)
                jax.block_until_ready(m)
                tracing = args.profile and not results
                if tracing:
                    jax.profiler.start_trace(args.profile)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    state, m = train(state, shape, batch)
                jax.block_until_ready(m)
                step_s = (time.perf_counter() - t0) / args.steps
                if tracing:
                    jax.profiler.stop_trace()
                    from profile_summary import summarize

                    print(summarize(args.profile), flush=True)
            except Exception as e:  # noqa: BLE001 - report OOM and go on with the next length
                if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                    raise
                print(f"| {label} | {n_dev} | {shape.visual_len:,} | {shape.length:,} | OOM | | | | |",
                      flush=True)
                state, _ = state_lib.create_sharded(lambda: init_params(cfg, jax.random.key(0))["params"], tx,
                                                    mesh)
                continue
            results[i] = (step_s, tokens, flops)
            mfu = f"{100 * flops / step_s / (peak * n_dev):.1f}%" if peak else "n/a"
            mem = peak_memory_gib()
            print(f"| {label} | {n_dev} | {shape.visual_len:,} | {shape.length:,} | {step_s:.3f} | "
                  f"{tokens / step_s:,.0f} | {mfu} | {compile_s:.1f} | {'' if mem is None else f'{mem:.1f}'} |",
                  flush=True)
    if len(results) == len(outs):
        p = np.asarray(probs, np.float64)
        t = sum(p[i] * results[i][0] for i in results)
        tok = sum(p[i] * results[i][1] for i in results)
        fl = sum(p[i] * results[i][2] for i in results)
        mfu = f"{100 * fl / t / (peak * n_dev):.1f}%" if peak else "n/a"
        print(f"| {label} | {n_dev} | mix ({'/'.join(f'{100 * x:.0f}' for x in p)}) | {tok:,.0f} avg | {t:.3f} | "
              f"{tok / t:,.0f} | {mfu} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
