"""``python -m infstar_jax.sample``: text->image, text->video, image->video and video continuation.

    python -m infstar_jax.sample --ckpt CKPT --prompt "a corgi surfing a wave" --resolution 480p --duration 5 \\
        --out samples/ [--image cat.png | --video clip.mp4] [--seed 41] [--batch 4] [--prompts prompts.txt]

CKPT holds the converted parts transformer/, vae/ and text_encoder/. Each prompt gets its own seed (``--seed`` + its
index), and the same prompt and seed give the same video whatever else is in the batch. Outputs: one mp4 per video
(16 fps) or PNG per image, and ``contact_sheet.png`` of the batch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m infstar_jax.sample", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="folder with converted transformer/, vae/, text_encoder/")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    src.add_argument("--prompts", help="text file, one prompt per line")
    p.add_argument("--resolution", default="480p", help="480p or 720p (default 480p)")
    p.add_argument("--aspect", default="16:9", help="aspect ratio h:w of the output, e.g. 16:9, 1:1, 9:16")
    p.add_argument("--duration", type=float, default=5, help="seconds (0 = a single image; 5 or 10 at 480p)")
    p.add_argument("--out", required=True, help="output folder")
    cond = p.add_mutually_exclusive_group()
    cond.add_argument("--image", help="image-to-video: the first frame (png/jpg)")
    cond.add_argument("--video", help="video continuation: a video whose first 5 s are continued (needs 10 s)")
    p.add_argument("--seed", type=int, default=41, help="seed of the first prompt; prompt i uses seed + i")
    p.add_argument("--batch", type=int, default=1, help="prompts per jitted call")
    p.add_argument("--precision", default="infer", choices=["infer", "fp32"], help="transformer numerics")
    p.add_argument("--guidance", choices=["apg", "cfg", "none"], help="guidance (default: the released APG)")
    p.add_argument("--cfg-scale", type=float, help="guidance scale (default: the released 34)")
    p.add_argument("--num-scales", type=int, help="override the pyramid length (small models / quick tests)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def read_prompts(args) -> list[str]:
    if args.prompt:
        return list(args.prompt)
    path = Path(args.prompts)
    if not path.exists():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts")
    return prompts


def read_condition(args):
    """(images, videos) lists for the conditioning input, or (None, None)."""
    if args.image:
        from PIL import Image, UnidentifiedImageError

        path = Path(args.image)
        if not path.exists():
            raise FileNotFoundError(f"--image {path} does not exist")
        try:
            img = np.asarray(Image.open(path).convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"--image {path} is not a readable image (png, jpg, ...): {e}") from e
        return img, None
    if args.video:
        from infstar_jax.data import video as video_io

        info = video_io.probe(args.video)
        frames = video_io.read_frames(args.video, np.arange(info.num_frames))
        return None, frames
    return None, None


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from infstar_jax import schedules
    from infstar_jax.sampling.output import contact_sheet, write_mp4, write_png
    from infstar_jax.sampling.pipeline import Generator
    from infstar_jax.sampling.sampler import GuidanceConfig

    try:
        prompts = read_prompts(args)
        image, video = read_condition(args)
        guidance = None
        if args.guidance or args.cfg_scale:
            rel = schedules.released(args.resolution)
            guidance = GuidanceConfig(args.guidance or rel["guidance"],
                                      args.cfg_scale if args.cfg_scale is not None else float(rel["cfg"]),
                                      float(rel["apg_norm_threshold"]))
        overrides = {"num_scales": args.num_scales} if args.num_scales else {}
        gen = Generator.load(args.ckpt, resolution=args.resolution, aspect=args.aspect, duration=args.duration,
                             precision=args.precision, guidance=guidance, **overrides)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written, sheets = [], []
    for start in range(0, len(prompts), args.batch):
        batch = prompts[start:start + args.batch]
        seeds = [args.seed + start + i for i in range(len(batch))]
        frames = gen.generate(batch, seeds=seeds, images=None if image is None else [image] * len(batch),
                              videos=None if video is None else [video] * len(batch),
                              progress=not args.no_progress)
        sheets.append(frames)
        for i, f in enumerate(frames):
            stem = f"{start + i:04d}_seed{seeds[i]}"
            written.append(write_png(f[0], out / f"{stem}.png") if f.shape[0] == 1 else
                           write_mp4(f, out / f"{stem}.mp4"))
    write_png(contact_sheet(np.concatenate(sheets)), out / "contact_sheet.png")
    (out / "prompts.txt").write_text("\n".join(f"{p.name}\t{q}" for p, q in zip(written, prompts)) + "\n")
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
