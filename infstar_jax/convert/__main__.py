"""``python -m infstar_jax.convert {transformer,vae,t5} --src PATH --out DIR``.

Each subcommand lives in ``infstar_jax/convert/<name>.py`` and provides ``add_arguments(parser)`` and ``run(args)``.
Exits non-zero with a message naming every missing, unexpected or mis-shaped key.
"""

import argparse
import importlib
import logging
import sys

from infstar_jax.convert.common import ConversionError

SUBCOMMANDS = {
    "transformer": "the InfinityStar transformer (.pth, trainer .pth, or sharded safetensors folder)",
    "vae": "the video tokenizer (infinitystar_videovae.pth)",
    "t5": "the Flan-T5 text encoder (Hugging Face folder)",
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m infstar_jax.convert", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, help_text in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--src", required=True, help="source checkpoint (file or folder)")
        p.add_argument("--out", required=True, help="output directory (orbax checkpoint + infstar.json)")
        p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        if name == chosen:  # import only the converter asked for
            module = importlib.import_module(f"infstar_jax.convert.{name}")
            module.add_arguments(p)
            p.set_defaults(_module=module)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = args._module.run(args)
    except (ConversionError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
