"""``python -m infstar_jax.convert t5 --src FOLDER --out DIR``: a Hugging Face T5 folder -> infstar-jax T5 encoder.

The source is the release's ``text_encoder/flan-t5-xl-official/`` (or any T5 / T5EncoderModel folder): ``config.json``
plus weights in one of ``model.safetensors.index.json`` (+ shards), ``model.safetensors``,
``pytorch_model.bin.index.json`` (+ shards) or ``pytorch_model.bin`` (tried in that order). Only the encoder is
converted; the decoder and ``lm_head`` of a full T5 checkpoint are recognised and skipped, and
``encoder.embed_tokens.weight`` is the tied alias of ``shared.weight``. The tokenizer files are copied next to the
params so that the output directory is self-contained.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np

from infstar_jax.checkpoint import save_params_streaming
from infstar_jax.convert.common import (
    ConversionError,
    Rule,
    Table,
    TensorSource,
    convert,
    flatten_expected,
    open_source,
)

log = logging.getLogger(__name__)

EMBED_KEY = "shared.weight"
EMBED_ALIAS = "encoder.embed_tokens.weight"
# Keys of a full T5 (T5ForConditionalGeneration / T5Model) checkpoint that the encoder does not use.
_NON_ENCODER = re.compile(r"^(decoder\.|lm_head\.weight$)")


def add_arguments(parser) -> None:
    parser.description = __doc__.splitlines()[0]


def _read_config(src: Path):
    from infstar_jax.text.t5 import T5Config

    path = src / "config.json"
    if not path.exists():
        raise ConversionError(f"{src} has no config.json; pass the Hugging Face T5 folder (e.g. flan-t5-xl-official/)")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from e
    model_type = hf.get("model_type", "t5")
    if model_type != "t5":
        raise ConversionError(f"{path}: model_type is {model_type!r}, expected 't5'")
    try:
        return T5Config.from_hf(hf)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{path}: {e}") from e


def _merge(sources: list[TensorSource], description: str) -> TensorSource:
    """One lazy source over several torch shards (``pytorch_model.bin.index.json``)."""
    owner: dict[str, TensorSource] = {}
    for s in sources:
        for k in s.keys():
            if k in owner:
                raise ConversionError(f"{description}: key {k!r} appears in more than one shard")
            owner[k] = s
    return TensorSource(
        description,
        {k: s.shapes[k] for k, s in owner.items()},
        {k: s.dtypes[k] for k, s in owner.items()},
        lambda k: owner[k].load(k),
    )


def open_weights(src: Path) -> TensorSource:
    """The lazy tensor source of a Hugging Face folder (safetensors preferred over torch pickles)."""
    if (src / "model.safetensors.index.json").exists() or (src / "model.safetensors").exists():
        return open_source(src)
    bin_index = src / "pytorch_model.bin.index.json"
    if bin_index.exists():
        try:
            weight_map = json.loads(bin_index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConversionError(f"{bin_index} has no readable 'weight_map': {e}") from e
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (src / s).exists()]
        if missing:
            raise ConversionError(f"{src}: shard(s) {missing} named in {bin_index.name} are missing")
        merged = _merge([open_source(src / s) for s in shards], str(src))
        listed = set(weight_map)
        if set(merged.keys()) != listed:
            extra = sorted(set(merged.keys()) - listed)[:10]
            absent = sorted(listed - set(merged.keys()))[:10]
            raise ConversionError(
                f"{src}: shards and {bin_index.name} disagree (not indexed: {extra}; absent: {absent})"
            )
        return merged
    if (src / "pytorch_model.bin").exists():
        return open_source(src / "pytorch_model.bin")
    raise ConversionError(
        f"{src} holds no weights: expected model.safetensors(.index.json) or pytorch_model.bin(.index.json)"
    )


def build_table(config, source_keys) -> Table:
    """Torch key -> param rules for ``config``; decoder keys present in ``source_keys`` are listed as ignored."""
    d, h, dkv, f, n = config.d_model, config.num_heads, config.d_kv, config.d_ff, config.num_layers
    inner = h * dkv
    source_keys = set(source_keys)
    table = Table()
    embed_key = EMBED_KEY if EMBED_KEY in source_keys or EMBED_ALIAS not in source_keys else EMBED_ALIAS
    table.rules.append(Rule(("token_embedding",), (embed_key,), torch_shape=(config.vocab_size, d)))
    if embed_key == EMBED_KEY and EMBED_ALIAS in source_keys:
        table.ignored[EMBED_ALIAS] = f"tied to {EMBED_KEY} (the same tensor)"
    table.rules.append(
        Rule(
            ("relative_attention_bias",),
            ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",),
            torch_shape=(config.relative_attention_num_buckets, h),
        )
    )

    def per_layer(path, suffix, transform, torch_shape):
        keys = tuple(f"encoder.block.{i}.{suffix}" for i in range(n))
        table.rules.append(Rule(("layers", path), keys, transform, stacked=True, torch_shape=torch_shape))

    # torch Linear weights are [out, in]; ours are [in, ...out] split into heads where attention needs them.
    qkv = lambda w: w.T.reshape(d, h, dkv)  # noqa: E731
    per_layer("attention_norm", "layer.0.layer_norm.weight", lambda w: w, (d,))
    for name in ("q", "k", "v"):
        per_layer(name, f"layer.0.SelfAttention.{name}.weight", qkv, (inner, d))
    per_layer("o", "layer.0.SelfAttention.o.weight", lambda w: w.T.reshape(h, dkv, d), (d, inner))
    per_layer("mlp_norm", "layer.1.layer_norm.weight", lambda w: w, (d,))
    for name in ("wi_0", "wi_1") if config.is_gated_act else ("wi",):
        per_layer(name, f"layer.1.DenseReluDense.{name}.weight", np.transpose, (f, d))
    per_layer("wo", "layer.1.DenseReluDense.wo.weight", np.transpose, (d, f))
    table.rules.append(Rule(("final_norm",), ("encoder.final_layer_norm.weight",), torch_shape=(d,)))

    for k in source_keys:
        if _NON_ENCODER.match(k):
            table.ignored[k] = "decoder / lm_head of a full T5 checkpoint (only the encoder is converted)"
    return table


def _copy_tokenizer(src: Path, out: Path) -> list[str]:
    from infstar_jax.text.tokenizer import TOKENIZER_FILES

    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, out / name)
            copied.append(name)
    if "tokenizer.json" not in copied and "spiece.model" not in copied:
        log.warning("%s has no tokenizer.json or spiece.model: %s can encode token ids but not text", src, out)
    return copied


def run(args) -> Path:
    from infstar_jax.text.t5 import abstract_params

    src, out = Path(args.src), Path(args.out)
    if not src.is_dir():
        raise ConversionError(f"--src {src} is not a folder; pass the Hugging Face T5 folder holding config.json")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    config = _read_config(src)
    source = open_weights(src)
    table = build_table(config, source.keys())
    expected = flatten_expected(abstract_params(config))
    log.info("converting the T5 encoder from %s (%d layers, d_model %d)", source.description, config.num_layers,
             config.d_model)
    meta = {"kind": "t5", "config": config.to_dict(), "source": str(src.resolve())}
    out = save_params_streaming(out, convert(source, table, expected), meta, overwrite=args.overwrite)
    copied = _copy_tokenizer(src, out)
    log.info("copied tokenizer files %s", copied)
    return out
