"""Shared ml_collections config skeleton; the presets in ``configs/`` start from ``base_config()``.

A config has these sections: ``model`` (architecture name and/or explicit fields of ``TransformerConfig``),
``precision`` (``fp32`` / ``train`` / ``infer``), ``mesh`` (axis sizes and logical rules), ``schedule`` (resolution,
aspect, duration), and the ``sampling`` / ``train`` sections their commands read.
"""

from __future__ import annotations

import ml_collections

from infstar_jax import schedules
from infstar_jax.parallel import DEFAULT_RULES
from infstar_jax.transformer.config import TransformerConfig, architecture


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict({"architecture": "infinity_qwen8b", "overrides": {}})
    c.precision = "train"
    c.remat = "full"
    # Per packed length: "MAX_TOKENS:POLICY,..." (e.g. "20000:none"); longer steps use `remat`.
    c.remat_by_length = ""
    c.mesh = ml_collections.ConfigDict(
        {"shape": {"data": 1, "fsdp": -1, "context": 1, "tensor": 1}, "rules": [list(r) for r in DEFAULT_RULES]}
    )
    c.schedule = ml_collections.ConfigDict({"resolution": "480p", "aspect": "16:9", "duration": 5})
    return c


def transformer_config(c: ml_collections.ConfigDict) -> TransformerConfig:
    """The model section of a config -> ``TransformerConfig`` with the config's precision and remat."""
    overrides = dict(c.model.get("overrides", {}))
    name = c.model.get("architecture")
    cfg = architecture(name, **overrides) if name else TransformerConfig(**overrides)
    return cfg.with_precision(c.precision).replace(remat=c.get("remat", "none"))


def mesh_rules(c: ml_collections.ConfigDict) -> tuple:
    return tuple((name, tuple(ax) if isinstance(ax, list) else ax) for name, ax in c.mesh.rules)


SCHEDULE_OVERRIDES = ("num_scales", "image_rep", "video_rep", "semantic_scales", "detail_scale_min_tokens")


def sampling_schedule(c: ml_collections.ConfigDict) -> schedules.Schedule:
    """The sampler's schedule of a config: ``schedule.resolution`` / ``aspect`` / ``duration`` with whichever of
    ``SCHEDULE_OVERRIDES`` the section sets (tiny pyramids such as ``configs/toy.py``'s)."""
    s = c.schedule
    kw = {k: (tuple(s[k]) if isinstance(s[k], (list, tuple)) else int(s[k])) for k in SCHEDULE_OVERRIDES
          if s.get(k) is not None}
    return schedules.resolve(s.resolution, aspect=s.get("aspect"), duration=s.duration, **kw)
