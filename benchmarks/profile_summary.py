"""Summarises a JAX profiler trace (``*.xplane.pb``) of a GPU run: device time per XLA module execution and per HLO
op kind, without TensorBoard (``jax.profiler.ProfileData``).

    python benchmarks/profile_summary.py TRACE_DIR_OR_FILE [--top 30]

Used by ``bench_sample.py --profile DIR``. Device planes (``/device:GPU:N``): the "XLA Modules" line gives one event
per program execution (the sampler's steps), the "XLA Ops" line one per HLO op (fusions, custom calls such as cuBLAS
GEMMs and cuDNN attention, copies, dynamic slices); without it, the compute stream's kernels are grouped by name.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re


def find_xplane(path: str) -> str:
    if os.path.isfile(path):
        return path
    found = sorted(glob.glob(os.path.join(path, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not found:
        raise SystemExit(f"no *.xplane.pb under {path}")
    return found[-1]


def _stats(event) -> dict:
    out = {}
    try:
        for k, v in event.stats:
            out[k] = v
    except Exception:  # noqa: BLE001 - stats of some events cannot be decoded
        pass
    return out


def _kind(name: str, stats: dict) -> str:
    """A coarse op kind: the HLO category when recorded, else the op name without its numeric suffix."""
    for key in ("hlo_category", "category"):
        if stats.get(key):
            return str(stats[key])
    return re.sub(r"[._]\d+$", "", name)


def gpu_lines(path: str):
    """``(plane name, line name, events)`` of every non-empty line of the trace's GPU planes."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(find_xplane(path))
    for plane in data.planes:
        if plane.name.startswith("/device:GPU"):
            for line in plane.lines:
                events = list(line.events)
                if events:
                    yield plane.name, line.name, events


def is_ops_line(name: str) -> bool:
    """The line holding one event per HLO op ("XLA Ops"), or, without it, a stream's kernels."""
    return name == "XLA Ops" or name.startswith("Stream")


def summarize(path: str, top: int = 30) -> str:
    lines_out = []
    for plane_name, line_name, events in gpu_lines(path):
        total = sum(e.duration_ns for e in events) / 1e9
        lines_out.append(f"# {plane_name} line {line_name!r}: {len(events)} events, {total:.3f} s busy")
        if line_name == "XLA Modules":
            if len(events) <= 60:
                lines_out.append("| # | module | ms |")
                lines_out.append("|---|---|---|")
                for i, e in enumerate(events):
                    lines_out.append(f"| {i} | {e.name[:60]} | {e.duration_ns / 1e6:.2f} |")
            else:  # many programs (one per layer and step): totals per program
                per = collections.Counter()
                n = collections.Counter()
                for e in events:
                    per[e.name[:60]] += e.duration_ns
                    n[e.name[:60]] += 1
                lines_out.append("| module | runs | s |")
                lines_out.append("|---|---|---|")
                for name, ns in per.most_common(top):
                    lines_out.append(f"| {name} | {n[name]} | {ns / 1e9:.3f} |")
        if is_ops_line(line_name):
            by_kind = collections.Counter()
            by_name = collections.Counter()
            counts = collections.Counter()
            for e in events:
                st = _stats(e)
                k = _kind(e.name, st)
                by_kind[k] += e.duration_ns
                counts[k] += 1
                long = str(st.get("long_name", e.name))
                by_name[long[:200]] += e.duration_ns
            lines_out.append("| op kind | calls | s | share |")
            lines_out.append("|---|---|---|---|")
            for k, ns in by_kind.most_common(top):
                lines_out.append(f"| {k} | {counts[k]} | {ns / 1e9:.3f} | {100 * ns / 1e9 / total:.1f}% |")
            lines_out.append("| op (long name) | s |")
            lines_out.append("|---|---|")
            for k, ns in by_name.most_common(top):
                lines_out.append(f"| `{k}` | {ns / 1e9:.3f} |")
    return "\n".join(lines_out) if lines_out else "# no GPU planes in the trace"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    print(summarize(args.path, args.top))


if __name__ == "__main__":
    main()
