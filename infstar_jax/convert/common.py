"""Strict, streaming conversion of PyTorch checkpoints into infstar-jax param trees.

A converter is an explicit table of ``Rule``s: each rule fills one param leaf from one torch tensor (or from one tensor
per layer, stacked on a leading ``layers`` axis) through a transform. ``convert`` first validates the whole table
against the source's key names and shapes *without loading any data* (every torch key used or explicitly ignored,
every param filled, every shape as expected) and raises ``ConversionError`` naming each offending key; only then does
it yield the converted leaves one at a time, so that ``checkpoint.save_params_streaming`` can write them with host
memory bounded by the largest single (stacked) leaf.

Sources: a ``.pth``/``.pt``/``.bin`` torch pickle (opened with ``weights_only=True`` and ``mmap=True``: a checkpoint
from the internet cannot run code, and tensors are paged in on demand), a ``.safetensors`` file, or a folder holding
``model.safetensors.index.json`` and its shards (always following the index).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np


class ConversionError(Exception):
    """A checkpoint does not match what the converter expects; the message names the keys."""


def _to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.detach().cpu().numpy()


class TensorSource:
    """Read-only mapping ``torch key -> tensor`` whose tensors are loaded only when asked for."""

    def __init__(self, description: str, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str], loader):
        self.description = description
        self.shapes = shapes
        self.dtypes = dtypes
        self._loader = loader

    def keys(self) -> list[str]:
        return list(self.shapes)

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def load(self, key: str) -> np.ndarray:
        """The tensor as a numpy array (bf16/fp16 widened to fp32; other dtypes as stored)."""
        return self._loader(key)


def _torch_load(path: Path):
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise ConversionError(f"cannot read {path} as a torch checkpoint: {e}") from e
        # Legacy (non-zip) pickles cannot be memory-mapped.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for anything weights_only refuses
        raise ConversionError(
            f"refusing to load {path}: it is not a plain tensor checkpoint loadable with weights_only=True "
            f"(a pickle that would execute code or build arbitrary objects): {e}"
        ) from e


def _from_state_dict(sd: Mapping[str, Any], description: str) -> TensorSource:
    import torch

    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    others = sorted(k for k in sd if k not in tensors)
    if others:
        raise ConversionError(f"{description}: entries that are not tensors: {others[:10]}")
    return TensorSource(
        description,
        {k: tuple(v.shape) for k, v in tensors.items()},
        {k: str(v.dtype).replace("torch.", "") for k, v in tensors.items()},
        lambda k: _to_numpy(tensors[k]),
    )


_ST_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _safetensors_header(p: Path) -> tuple[int, dict]:
    """(data start offset, header dict) of a .safetensors file."""
    with open(p, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or n > 100 << 20:
            raise ConversionError(f"{p} is not a safetensors file (header length {n})")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def _read_safetensor(p: Path, base: int, entry: dict) -> np.ndarray:
    """Reads one tensor with plain file reads (no mmap: pages of tensors already converted must not stay resident)."""
    begin, end = entry["data_offsets"]
    dtype = entry["dtype"]
    if dtype not in _ST_DTYPES:
        raise ConversionError(f"{p}: unsupported safetensors dtype {dtype}")
    with open(p, "rb") as f:
        f.seek(base + begin)
        raw = np.fromfile(f, dtype=_ST_DTYPES[dtype], count=(end - begin) // np.dtype(_ST_DTYPES[dtype]).itemsize)
    raw = raw.reshape(entry["shape"])
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if dtype == "F16":
        return raw.astype(np.float32)
    return raw


def _safetensors_source(files: dict[str, Path], description: str) -> TensorSource:
    """``files`` maps each key to the shard file holding it."""
    headers: dict[Path, tuple[int, dict]] = {}
    shapes, dtypes = {}, {}
    for key, p in files.items():
        if not p.exists():
            raise ConversionError(f"{description}: shard {p.name} (holding {key!r}) is missing")
        if p not in headers:
            headers[p] = _safetensors_header(p)
        entry = headers[p][1].get(key)
        if entry is None:
            raise ConversionError(f"{description}: the index puts {key!r} in {p.name}, which does not contain it")
        shapes[key] = tuple(entry["shape"])
        dtypes[key] = entry["dtype"].lower()
    return TensorSource(
        description, shapes, dtypes, lambda k: _read_safetensor(files[k], headers[files[k]][0], headers[files[k]][1][k])
    )


def open_source(path: str | os.PathLike, nested: Sequence[Sequence[str]] = ((),)) -> TensorSource:
    """Opens a checkpoint lazily.

    Args:
      path: torch pickle, ``.safetensors`` file, or folder with ``model.safetensors.index.json`` (or a single
        ``model.safetensors``).
      nested: for torch pickles, candidate key paths to the state dict inside the pickled object, tried in order
        (e.g. ``(("trainer", "gpt_fsdp"), ())``). The first that exists is used.
    """
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path} does not exist")
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index} has no 'weight_map'")
            return _safetensors_source({k: path / v for k, v in weight_map.items()}, str(path))
        single = path / "model.safetensors"
        if single.exists():
            path = single
        else:
            raise ConversionError(
                f"{path} is a folder without model.safetensors.index.json or model.safetensors; "
                "pass the .pth file or the released weights folder"
            )
    if path.suffix == ".safetensors":
        return _safetensors_source({k: path for k in _safetensors_header(path)[1]}, str(path))
    obj = _torch_load(path)
    for route in nested:
        node = obj
        for k in route:
            if not isinstance(node, Mapping) or k not in node:
                node = None
                break
            node = node[k]
        if isinstance(node, Mapping) and node:
            where = "".join(f"[{k!r}]" for k in route)
            return _from_state_dict(node, f"{path}{where}")
    routes = [("".join(f"[{k!r}]" for k in r) or "<top level>") for r in nested]
    raise ConversionError(f"{path}: no state dict found at any of {routes}")


@dataclass(frozen=True)
class Rule:
    """Fills param ``path`` from torch key(s).

    ``keys`` has one entry (the tensor itself) or one per layer (stacked on a new leading axis). ``transform`` maps
    one torch tensor (numpy) to the param's per-layer value, e.g. a transpose.
    """

    path: tuple[str, ...]
    keys: tuple[str, ...]
    transform: Callable[[np.ndarray], np.ndarray] = lambda x: x
    stacked: bool = False
    # Shape of each torch tensor (checked before loading).
    torch_shape: tuple[int, ...] | None = None


@dataclass
class Table:
    rules: list[Rule] = field(default_factory=list)
    # Torch keys that are known, recognised and deliberately not converted (e.g. aliases, unused buffers).
    ignored: dict[str, str] = field(default_factory=dict)


def validate(source: TensorSource, table: Table, expected: Mapping[tuple[str, ...], tuple[tuple[int, ...], Any]]) -> None:
    """Checks names and shapes only. ``expected`` maps every param path to (shape, dtype)."""
    errors: list[str] = []
    used: set[str] = set()
    filled: set[tuple[str, ...]] = set()
    for rule in table.rules:
        filled.add(rule.path)
        for k in rule.keys:
            used.add(k)
            if k not in source:
                errors.append(f"missing key {k!r} (needed for param {'/'.join(rule.path)})")
            elif rule.torch_shape is not None and tuple(source.shapes[k]) != tuple(rule.torch_shape):
                errors.append(f"key {k!r} has shape {tuple(source.shapes[k])}, expected {tuple(rule.torch_shape)}")
        if rule.path not in expected:
            errors.append(f"internal: rule fills unknown param {'/'.join(rule.path)}")
    for k in source.keys():
        if k not in used and k not in table.ignored:
            errors.append(f"unexpected key {k!r} {tuple(source.shapes[k])}")
    for p in expected:
        if p not in filled:
            errors.append(f"param {'/'.join(p)} is not filled by any key")
    if errors:
        head = f"{source.description}: {len(errors)} problem(s) converting this checkpoint:\n  "
        raise ConversionError(head + "\n  ".join(errors[:50]) + ("\n  ..." if len(errors) > 50 else ""))


# Stacked leaves larger than this are written as layer chunks (checkpoint.chunk_key) so the converter holds at most
# about this much of a leaf at a time.
CHUNK_BYTES = 512 << 20


def convert(
    source: TensorSource,
    table: Table,
    expected: Mapping[tuple[str, ...], tuple[tuple[int, ...], Any]],
    chunk_bytes: int | None = None,
) -> Iterator[tuple[tuple[str, ...], jax.Array]]:
    """Validates, then yields ``(param path, host jax.Array)`` pieces one at a time, each shape/dtype-checked.

    A stacked (per-layer) leaf bigger than ``chunk_bytes`` is yielded as consecutive layer chunks under
    ``path + (checkpoint.chunk_key(start, end),)``; ``checkpoint.load_params`` reassembles them.
    """
    from infstar_jax.checkpoint import chunk_key

    validate(source, table, expected)
    cpu = jax.local_devices(backend="cpu")[0]
    for rule in table.rules:
        shape, dtype = expected[rule.path]
        if not rule.stacked:
            out = np.asarray(rule.transform(source.load(rule.keys[0])), dtype)
            _check_shape(source, rule, out.shape, shape)
            yield rule.path, jax.device_put(out, cpu)
            continue
        if len(rule.keys) != shape[0]:
            raise ConversionError(f"{source.description}: {len(rule.keys)} layers for {'/'.join(rule.path)}, "
                                  f"expected {shape[0]}")
        per_layer = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
        group = max(1, (chunk_bytes or CHUNK_BYTES) // max(per_layer, 1))
        for start in range(0, len(rule.keys), group):
            end = min(start + group, len(rule.keys))
            out = np.empty((end - start, *shape[1:]), dtype)
            for i in range(start, end):
                v = rule.transform(source.load(rule.keys[i]))
                _check_shape(source, rule, v.shape, shape[1:], rule.keys[i])
                out[i - start] = v
                del v
            # A host jax.Array: orbax writes it without a serialisation copy.
            piece = jax.device_put(out, cpu)
            del out
            path = rule.path if (start == 0 and end == len(rule.keys)) else rule.path + (chunk_key(start, end),)
            yield path, piece
            del piece


def _check_shape(source, rule, got, want, key=None):
    if tuple(got) != tuple(want):
        raise ConversionError(
            f"{source.description}: param {'/'.join(rule.path)} from {(key or rule.keys[0])!r} has shape "
            f"{tuple(got)}, expected {tuple(want)}"
        )


def flatten_expected(abstract_params: Any) -> dict[tuple[str, ...], tuple[tuple[int, ...], Any]]:
    """``{path: (shape, dtype)}`` of a (possibly boxed / abstract) param tree."""
    import flax.linen as nn
    import jax

    tree = nn.meta.unbox(abstract_params)
    out = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[tuple(str(k.key) for k in kp)] = (tuple(leaf.shape), np.dtype(leaf.dtype))
    return out
