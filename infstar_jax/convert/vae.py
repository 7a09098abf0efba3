"""Video tokenizer checkpoint (``infinitystar_videovae.pth``, SPEC §4.1, §4.5, §10.1) -> infstar-jax params.

The file is a ``torch.save`` dict; the weights the reference runs are under ``'vae'`` (``'ema'`` with ``--ema``).
Every other top-level entry is ignored, as the reference's loader does. The architecture (widths, layers per block,
latent channels, which blocks resample) is inferred from tensor shapes and recorded in ``infstar.json``
(``{"kind": "vae", "config": VAEConfig fields}``).

Keys recognised and deliberately not converted (``Table.ignored``): ``quantizer.lfq_{semantic,detail}.mask`` and their
aliases ``quantize.*.mask`` (int64 buffers, unused with bit labels), ``proj_down_two.*`` / ``proj_up_two.*`` (unused
by InfinityStar). ``scale_learnable_parameters`` is one (4,) tensor of which only element 0 is used: it becomes the
scalar param ``scale``.

Layouts: conv weights OIDHW -> ``(kT,kH,kW,Cin,Cout)``; RMS gains ``(C,1,1,1)`` -> ``(C,)``; Linear ``(out,in)`` ->
``(in,out)``. The saved tree is ``params`` without the ``{"params": ...}`` wrapper (``load_vae`` adds it).
"""

from __future__ import annotations

import itertools
import logging
import re

import numpy as np

from infstar_jax.checkpoint import save_params_streaming
from infstar_jax.convert.common import ConversionError, Rule, Table, TensorSource, convert, flatten_expected, open_source

log = logging.getLogger(__name__)

IGNORED = {
    "quantizer.lfq_semantic.mask": "BSQ buffer (int64 powers of two), unused with bit labels",
    "quantizer.lfq_detail.mask": "BSQ buffer (int64 powers of two; element 0 overflows), unused with bit labels",
    "quantize.lfq_semantic.mask": "alias of quantizer.lfq_semantic.mask (self.quantize = self.quantizer)",
    "quantize.lfq_detail.mask": "alias of quantizer.lfq_detail.mask (self.quantize = self.quantizer)",
    "proj_down_two.weight": "second-resolution projection, unused by InfinityStar",
    "proj_down_two.bias": "second-resolution projection, unused by InfinityStar",
    "proj_up_two.weight": "second-resolution projection, unused by InfinityStar",
    "proj_up_two.bias": "second-resolution projection, unused by InfinityStar",
}
_LINEAR = ("proj_down", "proj_up")


# ----------------------------------------------------------------------------------------------------------------------
# Architecture from shapes
# ----------------------------------------------------------------------------------------------------------------------


def _shape(shapes: dict, key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ConversionError(f"missing key {key!r}: this does not look like an InfinityStar video VAE state dict")
    return tuple(shapes[key])


def _indices(shapes: dict, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def infer_config(shapes: dict[str, tuple[int, ...]]):
    """``VAEConfig`` from the torch key -> shape table; raises ``ConversionError`` naming what is missing/inconsistent.

    The temporal compression list cannot be read off the encoder (its DC down-sampler has the same shapes with or
    without time compression); it is taken as the shortest list that reproduces the decoder's up-samplers (whose
    widths do depend on it) under the reference's index rule — ``[2, 2]`` for the release.
    """
    from infstar_jax.tokenizer.vae import VAEConfig

    downs = _indices(shapes, r"^encoder\.down_blocks\.(\d+)\.")
    ups = _indices(shapes, r"^decoder\.up_blocks\.(\d+)\.")
    if not downs:
        _shape(shapes, "encoder.down_blocks.0.resnets.0.conv1.conv.weight")
    n = len(downs)
    if downs != list(range(n)) or ups != list(range(n)):
        raise ConversionError(f"encoder down blocks {downs} and decoder up blocks {ups} must both be 0..N-1 for one N")
    widths = [_shape(shapes, f"encoder.down_blocks.{i}.resnets.0.conv1.conv.weight")[0] for i in range(n)]
    widths.append(_shape(shapes, "encoder.mid_block.resnets.0.conv1.conv.weight")[0])
    layers = len(_indices(shapes, r"^encoder\.down_blocks\.0\.resnets\.(\d+)\."))
    latent2 = _shape(shapes, "encoder.conv_out.conv.weight")[0]
    if latent2 % 2:
        raise ConversionError(f"encoder.conv_out has {latent2} output channels; expected 2 x latent channels")
    has_down = [f"encoder.down_blocks.{i}.downsamplers.0.conv.conv.conv.weight" in shapes for i in range(n)]
    has_up = [f"decoder.up_blocks.{i}.upsamplers.0.conv.conv.conv.weight" in shapes for i in range(n)]
    rev = widths[::-1]
    dec_tf = []
    for i in range(n):
        if not has_up[i]:
            dec_tf.append(None)
            continue
        cout = _shape(shapes, f"decoder.up_blocks.{i}.upsamplers.0.conv.conv.conv.weight")[0]
        if cout % (4 * rev[i + 1]) or cout // (4 * rev[i + 1]) not in (1, 2):
            raise ConversionError(
                f"decoder.up_blocks.{i}.upsamplers.0.conv.conv.conv.weight has {cout} output channels; expected "
                f"4 x {rev[i + 1]} (space only) or 8 x {rev[i + 1]} (space and time)"
            )
        dec_tf.append(cout // (4 * rev[i + 1]))
    k = sum(has_down)
    if has_down != [True] * k + [False] * (n - k):
        raise ConversionError(f"encoder down-samplers must be on the first blocks; found them on blocks {has_down}")
    base = dict(
        in_channels=_shape(shapes, "encoder.conv_in.conv.weight")[1],
        out_channels=_shape(shapes, "decoder.conv_out.conv.weight")[0],
        latent_channels=latent2 // 2,
        block_out_channels=tuple(widths),
        layers_per_block=layers,
        spatial_compression_list=(2,) * k,
    )
    for length in range(0, n + 1):
        for temporal in itertools.product((2, 1), repeat=length):
            try:
                cfg = VAEConfig(temporal_compression_list=temporal, **base)
            except ValueError:
                continue
            if [cfg.encoder_has_down(i) for i in range(n)] != has_down:
                continue
            if [cfg.decoder_has_up(i) for i in range(n)] != has_up:
                continue
            if [cfg.decoder_temporal_factor(i) if has_up[i] else None for i in range(n)] == dec_tf:
                return cfg
    raise ConversionError(
        f"no VAE architecture fits these shapes: widths {widths}, down-samplers on {has_down}, up-samplers on {has_up} "
        f"with temporal factors {dec_tf}"
    )


# ----------------------------------------------------------------------------------------------------------------------
# Key table
# ----------------------------------------------------------------------------------------------------------------------


def torch_key(path: tuple[str, ...]) -> str:
    """The reference state-dict key of a param path, e.g. ``encoder/down_blocks_0/downsampler/conv/kernel`` ->
    ``encoder.down_blocks.0.downsamplers.0.conv.conv.conv.weight``."""
    if path == ("scale",):
        return "scale_learnable_parameters"
    parts = []
    for p in path[:-1]:
        if m := re.fullmatch(r"(down_blocks|up_blocks|resnets)_(\d+)", p):
            parts += [m.group(1), m.group(2)]
        elif p == "downsampler":
            parts += ["downsamplers", "0", "conv"]
        elif p == "upsampler":
            parts += ["upsamplers", "0", "conv"]
        else:
            parts.append(p)
    leaf = path[-1]
    if leaf in ("kernel", "bias"):
        if path[0] not in _LINEAR:
            parts.append("conv")  # CogVideoXCausalConv3d wraps its nn.Conv3d as `.conv`
        parts.append("weight" if leaf == "kernel" else "bias")
    else:
        parts.append(leaf)
    return ".".join(parts)


def _conv_kernel(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 4, 1, 0))


def _gain(g: np.ndarray) -> np.ndarray:
    return g.reshape(g.shape[0])


def _linear(w: np.ndarray) -> np.ndarray:
    return np.transpose(w)


def _scale0(s: np.ndarray) -> np.ndarray:
    return np.asarray(s[0])  # elements 1..3 belong to the unused multi-resolution path


def key_table(expected: dict) -> Table:
    """One rule per param of ``expected`` (``{path: (shape, dtype)}``, paths without the ``params`` prefix)."""
    rules = []
    for path, (shape, _) in expected.items():
        key = torch_key(path)
        if path == ("scale",):
            rules.append(Rule(path, (key,), _scale0, torch_shape=(4,)))
        elif path[-1] == "kernel" and path[0] in _LINEAR:
            rules.append(Rule(path, (key,), _linear, torch_shape=tuple(shape[::-1])))
        elif path[-1] == "kernel":
            kt, kh, kw, cin, cout = shape
            rules.append(Rule(path, (key,), _conv_kernel, torch_shape=(cout, cin, kt, kh, kw)))
        elif path[-1] == "gamma":
            rules.append(Rule(path, (key,), _gain, torch_shape=(shape[0], 1, 1, 1)))
        else:
            rules.append(Rule(path, (key,), torch_shape=tuple(shape)))
    return Table(rules, ignored=dict(IGNORED))


def expected_params(cfg) -> dict:
    """``{param path: (shape, dtype)}`` of ``VideoVAE(cfg)`` (nothing allocated)."""
    import flax.linen as nn

    from infstar_jax.tokenizer.vae import VideoVAE, abstract_variables

    return flatten_expected(nn.meta.unbox(abstract_variables(VideoVAE(cfg)))["params"])


# ----------------------------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------------------------


def convert_vae(src, out_dir, *, ema: bool = False, overwrite: bool = False):
    """Converts ``src`` (``torch.save({'vae': state_dict, ...})``) into ``out_dir``; returns ``(out_dir, config)``."""
    which = "ema" if ema else "vae"
    source: TensorSource = open_source(src, nested=((which,),))
    cfg = infer_config(source.shapes)
    expected = expected_params(cfg)
    table = key_table(expected)
    log.info("converting %s: widths %s, %d layers per block, %d latent channels", source.description,
             list(cfg.block_out_channels), cfg.layers_per_block, cfg.latent_channels)
    meta = {"kind": "vae", "config": cfg.to_dict(), "source": str(src), "weights": which}
    leaves = convert(source, table, expected)
    return save_params_streaming(out_dir, leaves, meta, overwrite=overwrite, leaves_per_write=32), cfg


def add_arguments(parser) -> None:
    parser.add_argument("--ema", action="store_true", help="convert the 'ema' weights instead of 'vae'")


def run(args):
    out, _ = convert_vae(args.src, args.out, ema=args.ema, overwrite=args.overwrite)
    return out
