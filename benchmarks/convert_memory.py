"""Peak host memory (RSS) of converting a transformer checkpoint with the released 8B shapes.

Generates a sharded safetensors release folder (``model.safetensors.index.json`` + shards) holding the real
``infinity_qwen8b`` key names and shapes for ``--layers`` layers, converts it with
``python -m infstar_jax.convert transformer`` in a child process, and reports the child's peak RSS. Run with two layer
counts to fit ``RSS = a + b * layers`` and project the 36-layer release.

    python benchmarks/convert_memory.py --layers 2 4 --workdir /tmp/convmem
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def generate(folder: Path, layers: int, shard_bytes: int = 2 << 30) -> int:
    import torch
    from safetensors.torch import save_file

    from infstar_jax.convert.transformer import reference_shapes
    from infstar_jax.transformer.config import architecture

    cfg = architecture("infinity_qwen8b", depth=layers)
    shapes = reference_shapes(cfg, block_chunks=2 if layers % 2 == 0 else 1)
    folder.mkdir(parents=True, exist_ok=True)
    weight_map, shard, size, idx, total = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, size, idx
        if shard:
            name = f"model-{idx:05d}.safetensors"
            save_file(shard, folder / name)
            weight_map.update({k: name for k in shard})
            shard, size, idx = {}, 0, idx + 1

    for key, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 4
        if size + nbytes > shard_bytes:
            flush()
        shard[key] = torch.randn(shape, dtype=torch.float32)  # incompressible, like real weights
        size += nbytes
        total += nbytes
    flush()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--workdir", default="/tmp/infstar_convmem")
    args = ap.parse_args()
    work = Path(args.workdir)
    rows = []
    for n in args.layers:
        src, out = work / f"src{n}", work / f"out{n}"
        shutil.rmtree(work, ignore_errors=True)
        total = generate(src, n)
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "infstar_jax.convert", "transformer", "--src", str(src), "--out",
                        str(out)], check=True)
        dt = time.time() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, max over children so far
        if peak <= before:
            print(f"warning: peak RSS of this child not above the previous child's ({before} KiB)")
        rows.append((n, total / 2**30, peak / 2**20, dt))
        print(f"layers={n}: checkpoint {total / 2**30:.2f} GiB, peak RSS {peak / 2**20:.2f} GiB, {dt:.0f} s", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    if len(rows) >= 2:
        (n0, _, r0, _), (n1, _, r1, _) = rows[0], rows[-1]
        slope = (r1 - r0) / (n1 - n0)
        print(f"fit: peak RSS = {r0 - slope * n0:.2f} GiB + {slope:.3f} GiB/layer -> 36 layers: "
              f"{r0 + slope * (36 - n0):.2f} GiB (checkpoint 32.66 GiB)")


if __name__ == "__main__":
    main()
