"""The one wrapper over orbax for model weights.

A converted or exported model is a directory::

    DIR/infstar.json    {"kind": "transformer" | "vae" | "t5", "config": {...architecture...}, ...}
    DIR/params/         an orbax PyTree checkpoint of the param tree (plain nested dict of arrays)

``save_params_streaming`` writes the params piece by piece (orbax partial save), so a converter never needs the whole
model in host memory: a large layer-stacked leaf may arrive as consecutive *layer chunks* (``LayerChunk``), stored as
``<leaf>/__layers_<start>_<end>`` and reassembled on load, so the peak is one chunk, not one ``[layers, ...]`` tensor.
Everything is written under a temporary name and renamed at the end, so an interrupted conversion leaves nothing that
looks complete. Train-state checkpoints (optimizer, data iterator) go through
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
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp

log = logging.getLogger(__name__)

# orbax renamed load_pytree -> load and pytree_metadata -> metadata (0.12.8 warns on the old names; older releases
# only have the old ones).
_load = getattr(ocp, "load", None) or ocp.load_pytree
_save = getattr(ocp, "save", None) or ocp.save_pytree
_metadata = getattr(ocp, "metadata", None) or ocp.pytree_metadata

META_FILE = "infstar.json"
PARAMS_DIR = "params"


CHUNK_PREFIX = "__layers_"


def chunk_key(start: int, end: int) -> str:
    """Key of the layer chunk ``[start, end)`` of a stacked leaf."""
    return f"{CHUNK_PREFIX}{start:05d}_{end:05d}"


def _chunk_range(key: str) -> tuple[int, int]:
    a, b = key[len(CHUNK_PREFIX):].split("_")
    return int(a), int(b)


def _is_chunked(node) -> bool:
    return isinstance(node, Mapping) and bool(node) and all(str(k).startswith(CHUNK_PREFIX) for k in node)


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
    """Writes a whole param tree (already in memory or on devices, possibly sharded across processes) plus metadata,
    atomically. Every process of a multi-host job calls it; process 0 publishes."""
    out_dir = Path(out_dir)
    multi = jax.process_count() > 1
    # All processes of a job must write into the same temporary folder.
    tmp = out_dir.parent / f".{out_dir.name}.tmp" if multi else _tmp_sibling(out_dir)
    if jax.process_index() == 0:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        if multi:
            shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    if multi:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"infstar save_params {out_dir} start")
    try:
        _save(tmp / PARAMS_DIR, params)
        if jax.process_index() == 0:
            (tmp / META_FILE).write_text(json.dumps(dict(meta), indent=1, sort_keys=True))
            _publish(tmp, out_dir, overwrite)
    except BaseException:
        if jax.process_index() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if multi:
        multihost_utils.sync_global_devices(f"infstar save_params {out_dir} done")
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


def _stored_shapes(stored) -> dict[tuple[str, ...], tuple[tuple[int, ...], Any, list]]:
    """``{leaf path: (full shape, dtype, [(chunk key, start, end)] or [])}`` from orbax metadata."""
    out = {}

    def walk(node, path):
        if _is_chunked(node):
            chunks = sorted((k, *_chunk_range(k)) for k in node)
            first = node[chunks[0][0]]
            total = sum(e - b for _, b, e in chunks)
            if [b for _, b, _ in chunks] != [0] + [e for _, _, e in chunks[:-1]]:
                raise ValueError(f"{'/'.join(path)}: layer chunks {[c[1:] for c in chunks]} do not tile the stack")
            out[path] = ((total, *first.shape[1:]), first.dtype, chunks)
        elif isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, path + (str(k),))
        else:
            out[path] = (tuple(node.shape), node.dtype, [])

    walk(stored, ())
    return out


def _path_of(kp) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in kp)


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
    stored = _stored_shapes(_metadata(path).metadata)
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    if target is None:
        # Host arrays: restore onto the first CPU device, whatever devices the writer had.
        flat_target = {p: jax.ShapeDtypeStruct(shape, dt, sharding=cpu) for p, (shape, dt, _) in stored.items()}
    else:
        flat_target = {_path_of(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
    missing, unexpected = sorted(set(flat_target) - set(stored)), sorted(set(stored) - set(flat_target))
    if missing or unexpected:
        raise ValueError(f"{ckpt_dir}: param tree mismatch; missing {['/'.join(p) for p in missing][:10]}, "
                         f"unexpected {['/'.join(p) for p in unexpected][:10]}")
    read: dict[tuple[str, ...], Any] = {}
    for p, leaf in flat_target.items():
        shape, _, chunks = stored[p]
        if tuple(shape) != tuple(leaf.shape):
            raise ValueError(f"{ckpt_dir}: {'/'.join(p)} has shape {tuple(shape)}, expected {tuple(leaf.shape)}")
        sharding = getattr(leaf, "sharding", None) or cpu
        if not chunks:
            read[p] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
            continue
        for key, b, e in chunks:
            read[p + (key,)] = jax.ShapeDtypeStruct((e - b, *leaf.shape[1:]), leaf.dtype,
                                                    sharding=_chunk_sharding(sharding, e - b))
    raw = _load(path, _nest(read))
    out = {}
    for p, leaf in flat_target.items():
        node = raw
        for k in p:
            node = node[k]
        chunks = stored[p][2]
        if chunks:
            sharding = getattr(leaf, "sharding", None) or cpu
            parts = [node[key] for key, _, _ in chunks]
            node = jax.jit(lambda *xs: jnp.concatenate(xs, axis=0), out_shardings=sharding)(*parts)
        out[p] = node
    return _nest(out)


def _chunk_sharding(sharding, rows: int):
    """The target's sharding for a layer chunk; the leading (layers) axis is replicated if it cannot be split."""
    if isinstance(sharding, jax.sharding.NamedSharding) and len(sharding.spec) and sharding.spec[0] is not None:
        axes = sharding.spec[0] if isinstance(sharding.spec[0], tuple) else (sharding.spec[0],)
        if rows % int(np.prod([sharding.mesh.shape[a] for a in axes])):
            return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(None, *sharding.spec[1:]))
    return sharding
