"""Times text->video / text->image sampling with the released 8B architecture and random weights (issue 6).

The transformer runs in the ``infer`` precision (bf16 blocks and residual stream, fp32 heads), guidance is the released
APG (scale 34), text features are random (T5 excluded, as in the reference's figures). Each case runs once to compile
(persistent compilation cache: ``--cache-dir``), then ``--repeats`` timed runs; the AR loop (text step + every visual
step, ending in ``block_until_ready`` on the summed codes) and the VAE decode to uint8 frames (released widths, bf16,
chunked) are timed separately. Peak device memory is ``memory_stats()["peak_bytes_in_use"]``, read after the AR loop
(before the decode) and after the decode. Prints markdown rows.

    python benchmarks/bench_sample.py --case 480p_video --batch 1
    python benchmarks/bench_sample.py --small            # CPU smoke run with a tiny model
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

_MESH_CONTEXT = contextlib.ExitStack()

CASES = {
    "480p_video": dict(resolution="480p", duration=5),
    "720p_video": dict(resolution="720p", duration=5),
    "480p_image": dict(resolution="480p", duration=0),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=sorted(CASES), default="480p_video")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--text-len", type=int, default=100)
    ap.add_argument("--small", action="store_true", help="tiny model and pyramid (CPU smoke check)")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--latent-frames-per-chunk", type=int, default=4)
    ap.add_argument("--data-parallel", type=int, default=1, metavar="N",
                    help="shard the prompts over N devices (mesh data=N; weights replicated); --batch is global")
    ap.add_argument("--layer-loop", default=None, choices=("layers", "scan"),
                    help="sampler layer loop (default: the backend's, layers on GPU)")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="trace one more AR loop into DIR (and one decode into DIR_decode) and print their device-time summaries (profile_summary.py)")
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/infstar_jax/xla"))
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

    from infstar_jax import schedules
    from infstar_jax.sampling.sampler import GuidanceConfig, Sampler, default_layer_loop
    from infstar_jax.tokenizer.vae import ChunkedVAE, VAEConfig, VideoVAE, init_params as vae_init
    from infstar_jax.transformer.config import architecture
    from infstar_jax.transformer.model import init_params

    case = CASES[args.case]
    if args.small:
        cfg = architecture("infinity_qwen0b", depth=2, embed_dim=128, num_heads=4, num_kv_heads=2, head_dim=32,
                           mlp_dim=256, text_dim=64).with_precision("infer")
        sched = schedules.resolve(case["resolution"], "16:9", duration=min(case["duration"], 1), num_scales=4,
                                  detail_scale_min_tokens=15, semantic_scales=3)
        widths = (8, 16, 32, 32, 32)
    else:
        cfg = architecture("infinity_qwen8b").with_precision("infer")
        sched = schedules.resolve(case["resolution"], "16:9", duration=case["duration"])
        widths = (96, 192, 384, 384, 384)
    rel = schedules.released(case["resolution"])
    guidance = GuidanceConfig("apg", float(rel["cfg"]), float(rel["apg_norm_threshold"]))

    t0 = time.time()
    unbox = lambda t: jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, t,  # noqa: E731
                                   is_leaf=lambda x: hasattr(x, "value"))
    if (args.layer_loop or default_layer_loop()) == "layers":
        # Per-layer weights born separately (as the pipeline sends them), so that the device never holds the
        # stacked copy and the split one at once: the peak memory below is the sampler's.
        one = cfg.replace(depth=1)
        init_one = jax.jit(lambda k: unbox(init_params(one, k)["params"]))
        params = init_one(jax.random.key(0))
        first = jax.tree.map(lambda x: x[0], params.pop("blocks"))
        params["layers"] = [first] + [jax.tree.map(lambda x: x[0], init_one(jax.random.key(i))["blocks"])
                                      for i in range(1, cfg.depth)]
    else:
        params = jax.jit(lambda k: unbox(init_params(cfg, k)["params"]))(jax.random.key(0))
    jax.block_until_ready(params)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"# {args.case}: {n_params / 1e9:.3f} B params initialised in {time.time() - t0:.1f} s; "
          f"{len(sched.steps())} visual steps; device {jax.devices()[0].device_kind}", flush=True)

    b = args.batch
    text = jax.random.normal(jax.random.key(1), (b, args.text_len, cfg.text_dim), jnp.float32)
    lengths = jnp.full((b,), args.text_len - 3, jnp.int32)
    keys = jax.random.split(jax.random.key(2), b)
    mesh = None
    if args.data_parallel > 1:
        from jax.sharding import NamedSharding, PartitionSpec as P

        from infstar_jax import parallel

        if b % args.data_parallel:
            raise SystemExit(f"--batch {b} must be a multiple of --data-parallel {args.data_parallel}")
        mesh = parallel.make_mesh({"data": args.data_parallel})
        rows = NamedSharding(mesh, P("data"))
        params = jax.device_put(params, NamedSharding(mesh, P()))
        text, lengths, keys = (jax.device_put(x, rows) for x in (text, lengths, keys))
        _MESH_CONTEXT.enter_context(jax.set_mesh(mesh))
    sampler = Sampler(cfg, params, sched, guidance, layer_loop=args.layer_loop, donate_params=True)
    del params

    def ar():
        res = sampler.run(text, lengths, keys=keys)
        jax.block_until_ready(res.summed_codes)
        return res

    t0 = time.time()
    res = ar()
    print(f"# first run (compiles) {time.time() - t0:.1f} s", flush=True)
    times = []
    for _ in range(args.repeats):
        t0 = time.time()
        res = ar()
        times.append(time.time() - t0)
    ar_s = statistics.median(times)
    print(f"# AR loop runs: {', '.join(f'{t:.2f}' for t in times)} s", flush=True)
    stats = jax.local_devices()[0].memory_stats() or {}
    peak_ar = stats.get("peak_bytes_in_use", 0) / 2**30
    if args.profile:
        import sys

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from profile_summary import summarize

        jax.profiler.start_trace(args.profile)
        ar()
        jax.profiler.stop_trace()
        print(summarize(args.profile, top=45), flush=True)

    dec_s, peak_dec = float("nan"), float("nan")
    if not args.no_decode:
        vae = VideoVAE(VAEConfig(block_out_channels=widths), dtype=jnp.bfloat16)
        variables = jax.device_put(vae_init(vae, seed=0))
        runner = ChunkedVAE(vae, latent_frames_per_chunk=args.latent_frames_per_chunk, mesh=mesh)
        frames = runner.decode(variables, res.summed_codes, frames=True)
        jax.block_until_ready(frames)
        dts = []
        for _ in range(args.repeats):
            t0 = time.time()
            frames = runner.decode(variables, res.summed_codes, frames=True)
            jax.block_until_ready(frames)
            dts.append(time.time() - t0)
        dec_s = statistics.median(dts)
        if args.profile:
            jax.profiler.start_trace(args.profile + "_decode")
            jax.block_until_ready(runner.decode(variables, res.summed_codes, frames=True))
            jax.profiler.stop_trace()
            print(summarize(args.profile + "_decode", top=45), flush=True)
        peak_dec = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30
        print(f"# frames {tuple(frames.shape)}", flush=True)
    print(f"# layer loop: {sampler.layer_loop}")
    print("| case | batch | AR loop s | decode s | total s | per video s | peak GiB (AR / incl. decode) | device |")
    print(f"| {args.case} | {b} | {ar_s:.2f} | {dec_s:.3f} | {ar_s + dec_s:.2f} | {(ar_s + dec_s) / b:.2f} | "
          f"{peak_ar:.1f} / {peak_dec:.1f} | {jax.devices()[0].device_kind} |", flush=True)


if __name__ == "__main__":
    main()
