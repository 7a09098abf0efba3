"""The toy main job: the whole system end to end on a CPU machine, no weights to download.

    python -m infstar_jax.toy --workdir runs/toy

1. **Data**: moving-shapes videos with captions ("a red circle moving left"; ``data/toy.py``), 17 frames of 32x32
   at 16 fps, plus a held-out set.
2. **Tokenizer**: the toy video tokenizer (``configs/toy_tokenizer.py``: causal 3-D VAE + multi-scale BSQ, spatial
   stride 8, so 32x32 frames give the 4x4 latents of the toy schedule) trained from scratch by the shared trainer.
3. **Token cache**: every video encoded once with the trained tokenizer (posterior sample) and its caption with the
   toy text encoder (``toy_text_encoder``: a tiny T5 encoder with fixed random weights and a word-level tokenizer)
   into a tensorstore cache.
4. **Transformer**: the toy spacetime transformer (``configs/toy.py``) trained from the cache with bitwise
   self-correction, text dropout and per-scale weights.
5. **Sample**: videos from captions (guided by the learned unconditional embedding), written as mp4 plus a PNG
   contact sheet; the per-scale bit accuracy of the last training steps is printed (chance is 50%).

Every stage resumes: re-running the command skips finished stages (data, cache entries, trained runs) and continues
an interrupted training run from its last checkpoint. ``--tokenizer-steps`` / ``--transformer-steps`` shorten or
lengthen the runs (defaults: the configs').
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import zlib
from pathlib import Path

import numpy as np

log = logging.getLogger("infstar_jax.toy")

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
FRAMES = 17
TEXT_VOCAB = 512
DEFAULT_PROMPTS = ("a red circle moving right", "a blue square moving down", "a yellow triangle moving left",
                   "a green circle moving up")


# ----------------------------------------------------------------------------------------------------------------------
# The toy text encoder
# ----------------------------------------------------------------------------------------------------------------------


def word_ids(text: str, vocab_size: int = TEXT_VOCAB) -> list[int]:
    """Word-level ids for the toy text encoder: each lower-cased word or punctuation mark hashed into
    ``[2, vocab_size)`` (0 is T5's pad, 1 its ``</s>``); deterministic, no vocabulary file."""
    return [2 + zlib.crc32(w.encode()) % (vocab_size - 2) for w in re.findall(r"\w+|[^\w\s]", text.lower())]


def toy_text_encoder(text_cfg, seed: int = 0):
    """A tiny T5 encoder (``config.text`` of ``configs/toy.py``) with fixed random weights (``seed``) and the
    word-level tokenizer: the same features in every process, nothing to store."""
    import flax.linen as nn
    import jax

    from infstar_jax.text.t5 import T5Config, T5Encoder, TextEncoder
    from infstar_jax.text.tokenizer import T5_EOS_ID, T5_PAD_ID, T5Tokenizer

    cfg = T5Config(vocab_size=TEXT_VOCAB, d_model=int(text_cfg.d_model), d_kv=int(text_cfg.d_kv),
                   d_ff=int(text_cfg.d_ff), num_layers=int(text_cfg.num_layers), num_heads=int(text_cfg.num_heads))
    ids = np.zeros((1, 1), np.int32)
    params = nn.unbox(T5Encoder(cfg).init(jax.random.key(seed), ids, ids)["params"])
    tokenizer = T5Tokenizer(word_ids, pad_id=T5_PAD_ID, eos_id=T5_EOS_ID, max_length=int(text_cfg.max_length),
                            source="toy word hashing")
    return TextEncoder(cfg, params, tokenizer, buckets=(16, 32, int(text_cfg.max_length)))


# ----------------------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------------------


def _config(name: str, overrides: dict):
    from infstar_jax.train import load_config

    config = load_config(str(REPO / "configs" / name))
    with config.unlocked():
        for key, value in overrides.items():
            node = config
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
    return config


def _with_steps(config, steps: int | None):
    """``train.steps`` overridden (warm-up shortened to fit a very short run)."""
    if steps:
        with config.unlocked():
            config.train.steps = int(steps)
            config.train.warmup_steps = min(int(config.train.warmup_steps), max(int(steps) // 2, 0))
    return config


def make_data(workdir: Path, num: int) -> Path:
    from infstar_jax.data import toy

    out = workdir / "data"
    meta = out / "toy.jsonl"
    if not (meta.exists() and sum(1 for _ in open(meta)) == num):
        log.info("generating %d toy videos (%dx%d, %d frames) in %s", num, SIZE, SIZE, FRAMES, out)
        toy.generate(str(out), num, frames=FRAMES, size=(SIZE, SIZE), seed=0)
    return meta


def _train(config, run: Path, export_name: str, what: str) -> Path:
    """Trains ``config`` in ``run`` unless its export exists (an interrupted run resumes); returns the export."""
    from infstar_jax.training import loop

    export = run / "export" / export_name
    if not (export / "infstar.json").exists():
        log.info("training the toy %s in %s", what, run)
        loop.run(config, str(run))
    return export


def train_tokenizer(workdir: Path, meta: Path, steps: int | None) -> Path:
    log.info("stage 2/5: the toy tokenizer")
    config = _with_steps(_config("toy_tokenizer.py", {"data.metadata": str(meta), "data.toy": 0}), steps)
    return _train(config, workdir / "tokenizer", "vae", "tokenizer")


def fill_cache(workdir: Path, meta: Path, vae_dir: Path, text_encoder) -> Path:
    import jax
    import jax.numpy as jnp

    from infstar_jax.data import cache as cache_mod
    from infstar_jax.data import metadata as md
    from infstar_jax.tokenizer.vae import load_vae

    model, variables = load_vae(str(vae_dir))
    encode = jax.jit(lambda v, x, k: model.apply(v, x[None], key=k, method=model.encode)[0])
    counter = iter(range(10**9))

    def encode_video(frames):
        key = jax.random.fold_in(jax.random.key(1), next(counter))
        return np.asarray(encode(variables, jnp.asarray(frames), key))

    def encode_text(caption):
        features, lengths = text_encoder.encode([caption])
        return np.asarray(features[0, : int(lengths[0])])

    rule = md.DurationRule(duration_resolution=0.25)
    samples = md.load_metadata(str(meta), format="native", rule=rule)
    root = workdir / "cache"
    log.info("stage 3/5: encoding %d videos into the token cache %s", len(samples.samples), root)
    report = cache_mod.fill_cache(samples, encode_video, encode_text, str(root), pn=4,
                                  spatial_stride=model.config.spatial_factor, rule=rule, progress=True)
    log.info("token cache: %s", report)
    return root


def train_transformer(workdir: Path, cache: Path, steps: int | None) -> Path:
    log.info("stage 4/5: the toy transformer")
    config = _with_steps(_config("toy.py", {"data.cache": str(cache)}), steps)
    return _train(config, workdir / "transformer", "transformer", "transformer")


def sample(workdir: Path, transformer_dir: Path, vae_dir: Path, text_encoder, prompts, seed: int) -> dict:
    import jax
    import jax.numpy as jnp

    from infstar_jax import checkpoint
    from infstar_jax.config import sampling_schedule
    from infstar_jax.sampling import output
    from infstar_jax.sampling.sampler import GuidanceConfig, Sampler
    from infstar_jax.text.prompts import duration_prefix
    from infstar_jax.tokenizer.vae import ChunkedVAE, load_vae
    from infstar_jax.transformer.config import TransformerConfig

    config = _config("toy.py", {})
    s = config.schedule
    sched = sampling_schedule(config)
    meta = checkpoint.read_meta(str(transformer_dir))
    cfg = TransformerConfig.from_dict(meta["config"]).with_precision("fp32")
    params = jax.tree.map(jnp.asarray, checkpoint.load_params(str(transformer_dir), kind="transformer"))
    captions = [duration_prefix(int(s.duration)) + p for p in prompts]  # the training captions' form
    text, lengths = text_encoder.encode(captions)
    keys = jax.vmap(jax.random.key)(jnp.arange(seed, seed + len(prompts), dtype=jnp.uint32))
    log.info("stage 5/5: sampling %d videos (%d AR steps each)", len(prompts), len(sched.steps()))
    res = Sampler(cfg, params, sched, GuidanceConfig("cfg", 3.0)).run(text, lengths, keys=keys, progress=True)
    model, variables = load_vae(str(vae_dir))
    frames = np.asarray(ChunkedVAE(model).decode(variables, res.summed_codes, frames=True))
    out = workdir / "samples"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (prompt, video) in enumerate(zip(prompts, frames)):
        name = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")
        paths.append(str(output.write_mp4(video, out / f"{i:02d}_{name}.mp4")))
    sheet = np.repeat(np.repeat(output.contact_sheet(frames, frames_per_video=9), 4, axis=0), 4, axis=1)
    sheet_path = str(output.write_png(sheet, out / "contact_sheet.png"))
    (out / "prompts.txt").write_text("".join(f"{i:02d} {p}\n" for i, p in enumerate(prompts)))
    return {"videos": paths, "contact_sheet": sheet_path}


def final_accuracy(run: Path, last: int = 5) -> dict[str, float]:
    """Mean per-scale bit accuracy (``acc/sNN``) over the last ``last`` logged steps of a transformer run."""
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    rows = [r for r in rows if any(k.startswith("acc/s") for k in r)][-last:]
    keys = sorted({k for r in rows for k in r if re.fullmatch(r"acc/s\d+", k)})
    return {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infstar_jax.toy", description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="runs/toy", help="everything goes here (default runs/toy)")
    ap.add_argument("--videos", type=int, default=256, help="toy training videos (default 256)")
    ap.add_argument("--tokenizer-steps", type=int, default=None, help="default: configs/toy_tokenizer.py's")
    ap.add_argument("--transformer-steps", type=int, default=None, help="default: configs/toy.py's")
    ap.add_argument("--prompt", action="append", default=None,
                    help="caption to sample (repeatable; default four shapes, colours and directions)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    log.info("stage 1/5: toy data")
    meta = make_data(workdir, args.videos)
    vae_dir = train_tokenizer(workdir, meta, args.tokenizer_steps)
    text_encoder = toy_text_encoder(_config("toy.py", {}).text)
    cache = fill_cache(workdir, meta, vae_dir, text_encoder)
    transformer_dir = train_transformer(workdir, cache, args.transformer_steps)
    outputs = sample(workdir, transformer_dir, vae_dir, text_encoder, tuple(args.prompt or DEFAULT_PROMPTS),
                     args.seed)

    acc = final_accuracy(workdir / "transformer")
    tok_eval = [json.loads(line) for line in open(workdir / "tokenizer" / "metrics.jsonl")]
    psnr = [r for r in tok_eval if any(k.startswith("eval/psnr") for k in r)]
    print("\n== toy main job done ==")
    if psnr:
        last = psnr[-1]
        print("tokenizer, held-out PSNR by scales kept: " + ", ".join(
            f"{k.split('_k')[-1]}: {v:.1f} dB" for k, v in sorted(last.items()) if k.startswith("eval/psnr")))
    print("transformer, bit accuracy per scale (last steps; chance 50%): " + ", ".join(
        f"{k[5:]}: {100 * v:.1f}%" for k, v in acc.items()))
    print("videos:\n  " + "\n  ".join(outputs["videos"]))
    print(f"contact sheet: {outputs['contact_sheet']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
