"""Packing training examples into one sequence (SPEC §1.9, §7.3, §7.6).

A packed sequence is ``[visual blocks of example 0, example 1, ... | text block 0, text block 1, ... | pad]``. The
block structure (``BlockLayout``), loss bookkeeping and block sizes are static for a given packing *shape*
(schedules, kept scales, text slot lengths); the RoPE positions depend on the kept repetitions and are data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from infstar_jax import schedules
from infstar_jax.transformer.attention import BlockLayout


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
    """One example's place in a packed sequence.

    Attributes:
      schedule: the example's full scale schedule ``[(pt, ph, pw), ...]``.
      scales_per_clip: N.
      reps: repetitions per scale of the full schedule.
      kept: indices of the kept scales (all of them unless a var-len outcome was drawn), ascending.
      text_len: number of valid text rows; ``text_slot`` (>= text_len) rows are reserved in the sequence.
      detail_scale_min_tokens: quantiser/head rule threshold.
    """

    schedule: tuple[tuple[int, int, int], ...]
    scales_per_clip: int
    reps: tuple[int, ...]
    kept: tuple[int, ...]
    text_len: int
    text_slot: int
    detail_scale_min_tokens: int

    def __post_init__(self):
        if self.text_slot < self.text_len:
            raise ValueError(f"text slot {self.text_slot} shorter than the text ({self.text_len} rows)")
        if list(self.kept) != sorted(set(self.kept)) or not all(0 <= s < len(self.schedule) for s in self.kept):
            raise ValueError(f"kept scales {self.kept} must be ascending indices into {len(self.schedule)} scales")


@dataclasses.dataclass(frozen=True)
class VisualBlock:
    example: int
    si: int
    shape: tuple[int, int, int]
    offset: int
    detail: bool
    ref_blocks: tuple[int, ...]
    frame_ss: int
    weight: float  # normalised loss weight (SPEC §7.6)


@dataclasses.dataclass(frozen=True)
class Packing:
    """Static structure of a packed sequence."""

    examples: tuple[ExampleSpec, ...]
    layout: BlockLayout
    visual: tuple[VisualBlock, ...]
    visual_len: int
    text_offsets: tuple[int, ...]

    @property
    def length(self) -> int:
        return self.layout.length

    def token_is_detail(self) -> np.ndarray:
        """``[Lv]`` bool: the token's block uses the detail head."""
        return np.concatenate([np.full(int(np.prod(b.shape)), b.detail) for b in self.visual])

    def token_block(self) -> np.ndarray:
        """``[Lv]`` int32: visual block index of each visual token."""
        return np.concatenate(
            [np.full(int(np.prod(b.shape)), i, np.int32) for i, b in enumerate(self.visual)]
        ).astype(np.int32)

    def block_weights(self) -> np.ndarray:
        return np.asarray([b.weight for b in self.visual], np.float32)

    def key_valid(self) -> np.ndarray:
        """``[L]`` bool: False for unused rows of text slots (the pad block sees nothing anyway)."""
        valid = np.ones(self.length, bool)
        for ex, off in zip(self.examples, self.text_offsets):
            valid[off + ex.text_len : off + ex.text_slot] = False
        return valid

    def positions(self, repeat_idx: Sequence[Sequence[int]]) -> np.ndarray:
        """``[L, 4]`` int32 RoPE positions; ``repeat_idx[e][k]`` = kept repetition of example e's k-th kept scale."""
        pos = np.full((self.length, 4), -1, np.int32)
        k_of = {}
        for b in self.visual:
            k = k_of.get(b.example, 0)
            k_of[b.example] = k + 1
            ex = self.examples[b.example]
            r = int(repeat_idx[b.example][k])
            if not 0 <= r < ex.reps[b.si]:
                raise ValueError(f"example {b.example} scale {b.si}: repetition {r} out of {ex.reps[b.si]}")
            real_sid = schedules.real_sid_starts(ex.reps)[b.si] + r
            p = schedules.visual_rope_positions(b.shape, ex.schedule[-1][1:], real_sid, b.frame_ss)
            pos[b.offset : b.offset + len(p)] = p
        for ex, off in zip(self.examples, self.text_offsets):
            pos[off : off + ex.text_slot] = schedules.text_rope_positions(ex.text_slot)
        return pos


def pack(examples: Sequence[ExampleSpec], pad_to_multiple: int = 128, reweight_k: int = 4,
         max_reweight: float = 40.0) -> Packing:
    """Lays out examples: visual blocks (example order, kept-scale order), then text blocks, then one pad block."""
    examples = tuple(examples)
    lengths: list[int] = []
    visual_meta = []
    offset = 0
    for e, ex in enumerate(examples):
        ctx = schedules.context_info(ex.schedule, ex.scales_per_clip)
        refs = schedules.remap_context(ctx, ex.kept)
        first_block = len(lengths)
        v_max = int(np.prod(ex.schedule[-1]))
        for k, si in enumerate(ex.kept):
            shape = tuple(int(x) for x in ex.schedule[si])
            n = int(np.prod(shape))
            visual_meta.append(
                dict(
                    example=e,
                    si=si,
                    shape=shape,
                    offset=offset,
                    detail=schedules.head_is_detail(shape[1], shape[2], ex.detail_scale_min_tokens),
                    ref_blocks=tuple(first_block + r for r in refs[k]),
                    frame_ss=ctx[si]["frame_ss"],
                    volume=n,
                    v_max=v_max,
                )
            )
            lengths.append(n)
            offset += n
    visual_len = offset
    n_visual = len(lengths)
    text_offsets = []
    for ex in examples:
        text_offsets.append(offset)
        lengths.append(ex.text_slot)
        offset += ex.text_slot
    sees: list[tuple[int, ...]] = []
    for b in visual_meta:
        text_block = n_visual + b["example"]
        sees.append(tuple(sorted({len(sees), text_block, *b["ref_blocks"]})))
    for e in range(len(examples)):
        sees.append((n_visual + e,))
    pad = (-offset) % pad_to_multiple if pad_to_multiple else 0
    if pad:
        lengths.append(pad)
        sees.append(())
    weights = schedules.loss_weights(
        [b["volume"] for b in visual_meta], [b["v_max"] for b in visual_meta], reweight_k, max_reweight
    )
    visual = tuple(
        VisualBlock(
            b["example"], b["si"], b["shape"], b["offset"], b["detail"], b["ref_blocks"], b["frame_ss"], float(w)
        )
        for b, w in zip(visual_meta, weights)
    )
    return Packing(examples, BlockLayout(tuple(lengths), tuple(sees)), visual, visual_len, tuple(text_offsets))
