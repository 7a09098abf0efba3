"""The one wrapper over orbax for model weights.

A converted or exported model is a directory::

    DIR/infstar.json    {"kind": "transformer" | "vae" | "t5", "config": {...architecture...}, ...}
    DIR/params/         an orbax PyTree checkpoint of the param tree (plain nested dict of arrays)

``save_params_streaming`` writes the params leaf by leaf (orbax partial save), so a converter never needs the whole
model in host memory; everything is written under a temporary name and renamed at the end, so an interrupted
conversion leaves nothing that looks complete. Train-state checkpoints (optimizer, data iterator) go through
``infstar_jax.training`` (an orbax ``CheckpointManager``); they restore params in this same tree layout.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp

log = logging.getLogger(__name__)

# orbax renamed load_pytree -> load and pytree_metadata -> metadata (0.12.8 warns on the old names; older releases
# only have the old ones).
_load = getattr(ocp, "load", None) or ocp.load_pytree
_metadata = getattr(ocp, "metadata", None) or ocp.pytree_metadata

META_FILE = "infstar.json"
PARAMS_DIR = "params"


def _nest(flat: Mapping[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out


def _tmp_sibling(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"


def _publish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def save_params_streaming(
    out_dir: str | os.PathLike,
    leaves: Iterable[tuple[tuple[str, ...], np.ndarray]],
    meta: Mapping[str, Any],
    *,
    overwrite: bool = False,
    leaves_per_write: int = 1,
) -> Path:
    """Writes ``(path, array)`` pairs one group at a time, then the metadata; atomic at the directory level.

    Args:
      out_dir: destination directory (created; must not exist unless ``overwrite``).
      leaves: iterator of (param path tuple, numpy array); consumed lazily so only ``leaves_per_write`` arrays are
        alive at once.
      meta: JSON-serialisable metadata (``kind``, ``config``, provenance).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(out_dir)
    tmp.mkdir()
    try:
        pending: dict[tuple[str, ...], np.ndarray] = {}
        wrote_any = False
        for path, array in leaves:
            pending[path] = array
            if len(pending) >= leaves_per_write:
                ocp.partial.save(tmp / PARAMS_DIR, _nest(pending))
                pending.clear()
                wrote_any = True
        if pending or not wrote_any:
            ocp.partial.save(tmp / PARAMS_DIR, _nest(pending))
        ocp.partial.finalize(tmp / PARAMS_DIR)
        (tmp / META_FILE).write_text(json.dumps(dict(meta), indent=1, sort_keys=True))
        _publish(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def save_params(out_dir: str | os.PathLike, params: Any, meta: Mapping[str, Any], *, overwrite: bool = False) -> Path:
    """Writes a whole param tree (already in memory or on devices) plus metadata, atomically."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(out_dir)
    tmp.mkdir()
    try:
        ocp.save_pytree(tmp / PARAMS_DIR, params)
        (tmp / META_FILE).write_text(json.dumps(dict(meta), indent=1, sort_keys=True))
        _publish(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_meta(ckpt_dir: str | os.PathLike) -> dict:
    """The metadata of a converted checkpoint; a clear error if ``ckpt_dir`` is not one."""
    ckpt_dir = Path(ckpt_dir)
    meta_path = ckpt_dir / META_FILE
    if not meta_path.exists() or not (ckpt_dir / PARAMS_DIR).exists():
        raise FileNotFoundError(
            f"{ckpt_dir} is not an infstar-jax checkpoint (expected {META_FILE} and {PARAMS_DIR}/ inside); "
            "create one with `python -m infstar_jax.convert ...`"
        )
    return json.loads(meta_path.read_text())


def load_params(ckpt_dir: str | os.PathLike, target: Any = None, *, kind: str | None = None) -> Any:
    """Restores params.

    Args:
      ckpt_dir: a directory written by ``save_params``/``save_params_streaming``.
      target: optional tree of ``jax.ShapeDtypeStruct`` (with ``.sharding``) or arrays; params are then restored
        already sharded, cast to the target dtypes, and shape-checked. ``None`` restores arrays on the host CPU.
      kind: if given, the checkpoint's ``kind`` must match.
    """
    meta = read_meta(ckpt_dir)
    if kind is not None and meta.get("kind") != kind:
        raise ValueError(f"{ckpt_dir} holds a {meta.get('kind')!r} checkpoint, expected {kind!r}")
    path = Path(ckpt_dir) / PARAMS_DIR
    stored = _metadata(path).metadata
    if target is None:
        # Host arrays: restore onto the first CPU device, whatever devices the writer had.
        cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=cpu), stored)
    flat_t, _ = jax.tree_util.tree_flatten_with_path(target)
    flat_s = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(stored)[0]}
    want = {jax.tree_util.keystr(k) for k, _ in flat_t}
    have = set(flat_s)
    if want != have:
        raise ValueError(
            f"{ckpt_dir}: param tree mismatch; missing {sorted(want - have)[:10]}, unexpected {sorted(have - want)[:10]}"
        )
    for k, leaf in flat_t:
        s = flat_s[jax.tree_util.keystr(k)]
        if tuple(s.shape) != tuple(leaf.shape):
            raise ValueError(f"{ckpt_dir}: {jax.tree_util.keystr(k)} has shape {tuple(s.shape)}, expected {tuple(leaf.shape)}")
    return _load(path, target)
