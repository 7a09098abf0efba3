"""Transformer checkpoints (SPEC §1.1, §6.2, §7.7) -> infstar-jax params.

Accepted sources: a plain state dict ``.pth`` (``torch.save(model.state_dict())``), the trainer's ``.pth`` with the
weights under ``['trainer']['gpt_fsdp']``, or the release's folder of safetensors shards with
``model.safetensors.index.json``. Block keys are ``block_chunks.{c}.module.{j}.*`` (layer ``c * per_chunk + j``) or
``blocks.{i}.*``. The architecture is inferred from tensor shapes and recorded in ``infstar.json``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import jax

from infstar_jax.checkpoint import save_params_streaming
from infstar_jax.convert.common import ConversionError, Rule, Table, TensorSource, convert, flatten_expected, open_source
from infstar_jax.transformer.config import ARCHITECTURES, TransformerConfig

log = logging.getLogger(__name__)

NESTED_ROUTES = (("trainer", "gpt_fsdp"), ("gpt_fsdp",), ("trainer", "gpt_wo_ddp"), ())
_BLOCK_RE = re.compile(r"^(?:block_chunks\.(\d+)\.module\.(\d+)|blocks\.(\d+))\.(.+)$")


def layer_keys(source: TensorSource) -> tuple[dict[int, str], int]:
    """Maps global layer index -> key prefix (``'block_chunks.c.module.j.'`` or ``'blocks.i.'``); and block_chunks."""
    chunked: dict[tuple[int, int], str] = {}
    plain: dict[int, str] = {}
    for k in source.keys():
        m = _BLOCK_RE.match(k)
        if not m:
            continue
        if m.group(1) is not None:
            c, j = int(m.group(1)), int(m.group(2))
            chunked[(c, j)] = f"block_chunks.{c}.module.{j}."
        else:
            plain[int(m.group(3))] = f"blocks.{m.group(3)}."
    if chunked and plain:
        raise ConversionError(f"{source.description}: mixes 'blocks.i.*' and 'block_chunks.c.module.j.*' keys")
    if plain:
        idx = sorted(plain)
        if idx != list(range(len(idx))):
            raise ConversionError(f"{source.description}: block indices {idx} are not 0..{len(idx) - 1}")
        return plain, 1
    if not chunked:
        raise ConversionError(f"{source.description}: no transformer block keys (blocks.* / block_chunks.*) found")
    chunks = sorted({c for c, _ in chunked})
    per = sorted({j for _, j in chunked})
    if chunks != list(range(len(chunks))) or per != list(range(len(per))) or len(chunked) != len(chunks) * len(per):
        raise ConversionError(
            f"{source.description}: block_chunks keys do not form a full grid (chunks {chunks}, per chunk {per})"
        )
    return {c * len(per) + j: prefix for (c, j), prefix in chunked.items()}, len(chunks)


def _shape(source: TensorSource, key: str) -> tuple[int, ...]:
    if key not in source:
        raise ConversionError(f"{source.description}: missing key {key!r} (needed to infer the architecture)")
    return source.shapes[key]


def infer_config(source: TensorSource) -> tuple[TransformerConfig, int]:
    """Architecture from tensor shapes (depth, width, heads from the qk-norm size, kv heads, MLP, text width)."""
    layers, chunks = layer_keys(source)
    p0 = layers[0]
    c, latent = _shape(source, "word_embed.weight")
    (hd,) = _shape(source, p0 + "attn.q_norm.weight")
    q_out = _shape(source, p0 + "attn.q_proj.weight")[0]
    kv_out = _shape(source, p0 + "attn.k_proj.weight")[0]
    if q_out % hd or kv_out % hd:
        raise ConversionError(f"{source.description}: q/k projection widths {q_out}/{kv_out} not multiples of head_dim {hd}")
    mlp = _shape(source, p0 + "mlp.gate_proj.weight")[0]
    text_rows, text_dim = _shape(source, "cfg_uncond")
    cfg = TransformerConfig(
        depth=len(layers),
        embed_dim=c,
        num_heads=q_out // hd,
        num_kv_heads=kv_out // hd,
        head_dim=hd,
        mlp_dim=mlp,
        qkvo_bias=(p0 + "attn.q_proj.bias") in source,
        text_dim=text_dim,
        text_maxlen=text_rows,
        latent_dim=latent,
        detail_bits=_shape(source, "head.weight")[0] // 2,
        semantic_bits=_shape(source, "semantic_head2.weight")[0] // 2,
    )
    return cfg, chunks


def architecture_name(cfg: TransformerConfig, block_chunks: int) -> str | None:
    for name, arch in ARCHITECTURES.items():
        if all(getattr(cfg, k) == v for k, v in arch.items() if k != "block_chunks") and (
            arch["block_chunks"] == block_chunks
        ):
            return name
    return None


def reference_shapes(cfg: TransformerConfig, block_chunks: int = 1) -> dict[str, tuple[int, ...]]:
    """The reference state dict's key -> shape for ``cfg`` (``block_chunks`` > 1 gives block_chunks.c.module.j keys).

    Used to check manifests of the released models and to generate checkpoints of released shapes.
    """
    if cfg.depth % block_chunks:
        raise ValueError(f"depth {cfg.depth} is not divisible by block_chunks {block_chunks}")
    per = cfg.depth // block_chunks
    if block_chunks > 1:
        layers = {i: f"block_chunks.{i // per}.module.{i % per}." for i in range(cfg.depth)}
    else:
        layers = {i: f"blocks.{i}." for i in range(cfg.depth)}
    return {k: r.torch_shape for r in key_table(cfg, layers).rules for k in r.keys}


def _t(x):
    return x.T


def key_table(cfg: TransformerConfig, layers: dict[int, str]) -> Table:
    """Explicit torch key -> param path table (transforms map torch Linear ``[out, in]`` to our kernels)."""
    c, h, kv, hd, m = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    ct, lat, db, sb = cfg.text_dim, cfg.latent_dim, cfg.detail_bits, cfg.semantic_bits
    rules = [
        Rule(("cfg_uncond",), ("cfg_uncond",), torch_shape=(cfg.text_maxlen, ct)),
        Rule(("sos_token",), ("sos_token",), lambda x: x.reshape(-1), torch_shape=(1, 1, c)),
        Rule(("text_proj", "kernel"), ("text_proj.weight",), _t, torch_shape=(c, ct)),
        Rule(("text_proj", "bias"), ("text_proj.bias",), torch_shape=(c,)),
        Rule(("word_embed", "kernel"), ("word_embed.weight",), _t, torch_shape=(c, lat)),
        Rule(("word_embed", "bias"), ("word_embed.bias",), torch_shape=(c,)),
        Rule(("norm_hidden_sates", "scale"), ("norm_hidden_sates.weight",), torch_shape=(c,)),
        Rule(("head", "kernel"), ("head.weight",), _t, torch_shape=(2 * db, c)),
        Rule(("head", "bias"), ("head.bias",), torch_shape=(2 * db,)),
        Rule(("semantic_head2", "kernel"), ("semantic_head2.weight",), _t, torch_shape=(2 * sb, c)),
        Rule(("semantic_head2", "bias"), ("semantic_head2.bias",), torch_shape=(2 * sb,)),
    ]
    per_layer: list[tuple[tuple[str, ...], str, Callable, tuple[int, ...]]] = [
        (("attn", "q_proj", "kernel"), "attn.q_proj.weight", lambda x: x.T.reshape(c, h, hd), (h * hd, c)),
        (("attn", "k_proj", "kernel"), "attn.k_proj.weight", lambda x: x.T.reshape(c, kv, hd), (kv * hd, c)),
        (("attn", "v_proj", "kernel"), "attn.v_proj.weight", lambda x: x.T.reshape(c, kv, hd), (kv * hd, c)),
        (("attn", "o_proj", "kernel"), "attn.o_proj.weight", lambda x: x.T.reshape(h, hd, c), (c, h * hd)),
        (("attn", "q_norm", "scale"), "attn.q_norm.weight", lambda x: x, (hd,)),
        (("attn", "k_norm", "scale"), "attn.k_norm.weight", lambda x: x, (hd,)),
        (("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight", _t, (m, c)),
        (("mlp", "up_proj", "kernel"), "mlp.up_proj.weight", _t, (m, c)),
        (("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", _t, (c, m)),
        (("input_layernorm", "scale"), "input_layernorm.weight", lambda x: x, (c,)),
        (("post_attention_layernorm", "scale"), "post_attention_layernorm.weight", lambda x: x, (c,)),
    ]
    if cfg.qkvo_bias:
        per_layer += [
            (("attn", "q_proj", "bias"), "attn.q_proj.bias", lambda x: x.reshape(h, hd), (h * hd,)),
            (("attn", "k_proj", "bias"), "attn.k_proj.bias", lambda x: x.reshape(kv, hd), (kv * hd,)),
            (("attn", "v_proj", "bias"), "attn.v_proj.bias", lambda x: x.reshape(kv, hd), (kv * hd,)),
            (("attn", "o_proj", "bias"), "attn.o_proj.bias", lambda x: x, (c,)),
        ]
    order = [layers[i] for i in range(cfg.depth)]
    for path, suffix, fn, shape in per_layer:
        rules.append(Rule(("blocks",) + path, tuple(p + suffix for p in order), fn, stacked=True, torch_shape=shape))
    return Table(rules)


def expected_params(cfg: TransformerConfig) -> dict:
    from infstar_jax.transformer.model import init_params

    abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))["params"])
    return flatten_expected(abstract)


def convert_transformer(src, out_dir, *, overwrite: bool = False):
    """Converts ``src`` into ``out_dir``; returns ``(out_dir, config)``."""
    source = open_source(src, NESTED_ROUTES)
    cfg, chunks = infer_config(source)
    layers, _ = layer_keys(source)
    table = key_table(cfg, layers)
    expected = expected_params(cfg)
    name = architecture_name(cfg, chunks)
    log.info("converting %s: %s, %d layers, width %d, %d/%d heads", source.description, name or "custom", cfg.depth,
             cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads)
    meta = {
        "kind": "transformer",
        "config": cfg.to_dict(),
        "architecture": name,
        "block_chunks": chunks,
        "source": str(src),
    }
    leaves = convert(source, table, expected)
    return save_params_streaming(out_dir, _progress(leaves, len(table.rules)), meta, overwrite=overwrite), cfg


def _progress(it, total):
    from tqdm import tqdm

    return tqdm(it, total=total, desc="convert", unit="tensor", leave=False)


def add_arguments(parser) -> None:
    del parser  # the common --src/--out/--overwrite are all this converter needs


def run(args):
    out, _ = convert_transformer(args.src, args.out, overwrite=args.overwrite)
    return out

