"""infstar_jax.schedules against the reference's own schedule tables (D_manifests/schedules_released.json), the
explicit schedules of every B_transformer / C_sampling case (built from each case's meta.json), SPEC figures, and the
user-facing errors. numpy only."""

import json
import re

import numpy as np
import pytest

from goldens import GOLDEN_DIR, case_params, load_case
from infstar_jax import schedules as S

SCHEDULES_JSON = GOLDEN_DIR / "D_manifests" / "schedules_released.json"


def _load_released():
    if not SCHEDULES_JSON.exists():
        return None
    return json.loads(SCHEDULES_JSON.read_text())


D = _load_released()


@pytest.fixture(scope="module")
def d():
    if D is None:
        raise AssertionError(f"missing {SCHEDULES_JSON} (set INFSTAR_GOLDEN_DIR)")
    return D


def _entries(*path):
    """pytest params over the keys of one golden sub-dict; a missing file is one failing param, never a skip."""
    node = D
    for p in path:
        if node is None or p not in node:
            return [pytest.param(None, id="-".join(path) + "-missing")]
        node = node[p]
    return [pytest.param(k, id=str(k)) for k in node]


def _num_scales(pn: str) -> int:
    if pn in S.PIXEL_LEVELS:
        return S.PIXEL_LEVELS[pn]
    m = re.fullmatch(r"tiny(\d+)", pn)
    assert m, f"unknown pn {pn!r} in a golden meta"
    return int(m.group(1))


def _resolution_for(pn: str) -> str:
    return pn if pn in S.PIXEL_LEVELS else "480p"


def _lists(x):
    """Tuples -> lists recursively (golden JSON holds lists)."""
    if isinstance(x, (list, tuple)):
        return [_lists(v) for v in x]
    return x


# ------------------------------------------------------------------------------------------------------------------
# Pyramids and templates
# ------------------------------------------------------------------------------------------------------------------


def test_raw_ratio2hws(d):
    got = {repr(float(k)): _lists(v) for k, v in S.ratio2hws().items()}
    assert got == d["raw_ratio2hws"]
    assert all(len(v) == len(S.SCALE_SIDES) for v in S.ratio2hws().values())


def test_pixel_levels_and_templates(d):
    assert S.PIXEL_LEVELS == d["total_pixels2scales"]
    assert S.templates() == d["h_div_w_templates"]
    assert S.nearest_template(0.571) == d["template_for_0.571"]


def test_nearest_template_is_argmin_in_dict_order():
    keys = S.templates()
    for x in np.linspace(0.2, 3.5, 331):
        dist = [abs(x - k) for k in keys]
        assert S.nearest_template(x) == keys[dist.index(min(dist))]
    for k in keys:
        assert S.nearest_template(k) == k


@pytest.mark.parametrize("template", _entries("dynamic_resolution_video_frames_161"))
def test_dynamic_resolution_table(d, template):
    for pn, entry in d["dynamic_resolution_video_frames_161"][template].items():
        t = float(template)
        n = S.PIXEL_LEVELS[pn]
        table = S.pt2scale_schedule(t, pn, 161)
        assert list(S.pixel_hw(t, pn)) == entry["pixel_hw"], (template, pn)
        assert entry["image_scales"] == entry["scales_in_one_clip"] == n
        assert len(table[max(table)]) == entry["max_video_scales"]
        assert {str(k): _lists(v) for k, v in table.items()} == entry["pt2scale_schedule"], (template, pn)
        for pt, sched in entry["pt2scale_schedule"].items():
            got = S.scale_schedule(t, n, int(pt))
            assert _lists(got) == sched, (template, pn, pt)
            assert S.first_full_scale_index(got) == n - 1
            assert S.scales_per_clip_of(got) == n
        # 81 frames (training, 5 s inference) give the same entries up to pt 21.
        short = S.pt2scale_schedule(t, pn, 81)
        assert all(short[pt] == table[pt] for pt in short) and max(short) == 21


# ------------------------------------------------------------------------------------------------------------------
# Context tables, heads, RoPE positions
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("res", _entries("context_info_16x9_video_frames_161"))
def test_context_info_tables(d, res):
    n = S.PIXEL_LEVELS[S.RESOLUTIONS[res]]
    template = S.nearest_template(9 / 16)
    for pt, table in d["context_info_16x9_video_frames_161"][res].items():
        sched = S.scale_schedule(template, n, int(pt))
        got = S.context_info(sched, n)
        assert {str(si): c for si, c in enumerate(got)} == table, (res, pt)


@pytest.mark.parametrize("res", _entries("head_vs_quantizer_choice_released_args"))
def test_head_vs_quantizer_choice(d, res):
    for template, entry in d["head_vs_quantizer_choice_released_args"][res].items():
        sched = S.resolve(res, aspect=float(template), duration=0)
        assert sched.template == float(template)
        by_rel = {st.rel_si: st for st in sched.steps()}
        n = sched.scales_per_clip
        assert [("detail" if by_rel[r].head_detail else "semantic") for r in range(n)] == entry["head_by_rel_si"]
        assert [("detail" if by_rel[r].detail else "semantic") for r in range(n)] == entry["lfq_by_rel_si"]
        assert sched.head_mismatch() == entry["mismatch_rel_si"]


def _probe_request(res: str, key: str):
    m = re.fullmatch(r"(?:(\d+)x(\d+)|(\d+\.\d+))(?:_(\d+)s)?", key)
    assert m, f"unknown probe set {key!r}"
    # README: the 16x9 probes use the 10 s schedule at 480p and the 5 s one at 720p.
    duration = int(m.group(4)) if m.group(4) else (10 if res == "480p" else 5)
    aspect = f"{m.group(1)}:{m.group(2)}" if m.group(1) else float(m.group(3))
    return S.resolve(res, aspect=aspect, duration=duration)


@pytest.mark.parametrize("res", _entries("rope_position_probes"))
def test_rope_position_probes(d, res):
    for key, probes in d["rope_position_probes"][res].items():
        sched = _probe_request(res, key)
        for p in probes:
            si = p["si"]
            assert _lists(sched.scales[si]) == p["scale"]
            rep = p["real_sid"] - sched.real_sid_starts[si]
            assert 0 <= rep < sched.reps[si]
            got = sched.rope_positions(si, rep)
            np.testing.assert_array_equal(got, np.array(p["positions_scale_frame_row_col"]), err_msg=f"{key} si={si}")
            assert got.dtype == np.int32
            assert p["rope_shape"][4] == got.shape[0]


@pytest.mark.parametrize("template", _entries("rope_row_col_positions_all_templates"))
def test_rope_row_col_positions_all_templates(d, template):
    for pn, entry in d["rope_row_col_positions_all_templates"][template].items():
        pyr = S.spatial_pyramid(float(template), pn)
        uph, upw = pyr[-1]
        assert [uph, upw] == entry["largest_hw"]
        assert sorted(int(k) for k in entry["rows_by_ph"]) == sorted({h for h, _ in pyr})
        assert sorted(int(k) for k in entry["cols_by_pw"]) == sorted({w for _, w in pyr})
        for ph, rows in entry["rows_by_ph"].items():
            assert S.normalized_positions(int(ph), uph).tolist() == rows, (template, pn, ph)
        for pw, cols in entry["cols_by_pw"].items():
            assert S.normalized_positions(int(pw), upw).tolist() == cols, (template, pn, pw)


def test_normalized_positions_fp32_quirk():
    """SPEC §10.2: for up=57, p=14, index 7 is 28.500002 in fp32 (-> 29); fp64 would give 28.5 -> 28."""
    got = S.normalized_positions(14, 57)
    assert got[7] == 29
    assert np.rint(np.arange(14) * (57 / 14))[7] == 28
    assert got.dtype == np.int32
    np.testing.assert_array_equal(S.normalized_positions(53, 53), np.arange(53))


def test_text_rope_positions():
    pos = S.text_rope_positions(5)
    assert pos.dtype == np.int32 and pos.shape == (5, 4)
    np.testing.assert_array_equal(pos[:, 0], np.arange(5))
    assert not pos[:, 1:].any()


def test_visual_rope_positions_independent():
    """Against a per-token loop written from SPEC §1.6."""
    scale, largest, real_sid, frame_ss = (3, 4, 7), (30, 53), 45, 21
    got = S.visual_rope_positions(scale, largest, real_sid, frame_ss)
    rows, cols = S.normalized_positions(4, 30), S.normalized_positions(7, 53)
    want = [[512 + real_sid, frame_ss + t, rows[y], cols[x]] for t in range(3) for y in range(4) for x in range(7)]
    np.testing.assert_array_equal(got, np.array(want))


# ------------------------------------------------------------------------------------------------------------------
# Per-step tables of the reference AR loop
# ------------------------------------------------------------------------------------------------------------------

STEP_COLUMNS = {
    "step", "si", "clip", "rel_si", "repeat_idx", "repeat_times", "real_sid", "rope_scale_pos", "pt", "ph", "pw",
    "tokens", "frame_ss", "frame_ee", "head", "head_bits", "lfq", "tau", "cfg", "ref_sids", "ref_tokens", "text_len",
    "q_len", "kv_len", "kv_cache_write", "input_all_zero", "input_thw", "accum_code_thw", "ref_cache_written_at_step",
}


def _step_row(st: S.Step, text_len: int, cfg) -> dict:
    return {
        "step": st.index, "si": st.si, "clip": st.clip, "rel_si": st.rel_si, "repeat_idx": st.rep,
        "repeat_times": st.repeats, "real_sid": st.real_sid, "rope_scale_pos": S.TEXT_MAXLEN + st.real_sid,
        "pt": st.shape[0], "ph": st.shape[1], "pw": st.shape[2], "tokens": st.tokens, "frame_ss": st.frame_ss,
        "frame_ee": st.frame_ee, "head": "detail" if st.head_detail else "semantic",
        "head_bits": 64 if st.head_detail else 16, "lfq": "detail" if st.detail else "semantic", "tau": st.tau,
        "cfg": cfg, "ref_sids": list(st.ref_sids), "ref_tokens": st.ref_tokens, "text_len": text_len,
        "q_len": st.tokens, "kv_len": st.ref_tokens + text_len + st.tokens, "kv_cache_write": st.last_rep,
        "input_all_zero": st.zero_input, "input_thw": list(st.shape), "accum_code_thw": list(st.accum_shape),
        "ref_cache_written_at_step": list(st.ref_steps),
    }


def _per_step_tables():
    out = []
    for group in ("per_step_tables_16x9", "per_step_tables_16x9_other_durations"):
        out += [pytest.param(group, p.values[0], id=p.id) for p in _entries(group)]
    return out


def _check_per_step_table(table: dict, name: str):
    if "error" in table:
        m = re.match(r"(\d+p)_pt(\d+)", name)
        assert m, f"cannot read the request of error entry {name!r}"
        pt = int(m.group(2))
        with pytest.raises(ValueError, match="partial clip|no schedule"):
            S.resolve(m.group(1), aspect="16:9", frames=S.video_frames_for(pt))
        # The trainer still handles these durations.
        sched = S.resolve(m.group(1), aspect="16:9", frames=S.video_frames_for(pt), training=True)
        assert sched.latent_frames == pt
        return
    st = table["setting"]
    text_len = st["text_len_used_for_kv_len"]
    rel = S.released(st["resolution"])
    assert rel["pixel_level"] == st["pn"]
    for k_ours, k_gold in (("image_rep", "image_scale_repetition"), ("video_rep", "video_scale_repetition"),
                           ("semantic_scales", "semantic_scales"),
                           ("detail_scale_min_tokens", "detail_scale_min_tokens"), ("tau_image", "tau_image"),
                           ("tau_video", "tau_video"), ("cfg", "cfg")):
        assert rel[k_ours] == st[k_gold], k_gold
    sched = S.resolve(st["resolution"], aspect=st["h_div_w_template"],
                      frames=S.video_frames_for(st["pt_latent_frames"]))
    assert sched.template == st["h_div_w_template"]
    assert list(sched.pixel_hw) == st["pixel_hw"]
    assert sched.latent_frames == st["pt_latent_frames"]
    assert _lists(sched.scales) == table["scale_schedule"]
    assert sched.scales_per_clip == table["scales_in_one_clip"] == table["first_full_spatial_size_scale_index"] + 1
    assert {str(si): c for si, c in enumerate(sched.context)} == table["context_info"]
    assert list(sched.tau) == table["tau_list"]

    ts = table["text_step"]
    assert ts["q_len"] == ts["kv_len"] == text_len
    np.testing.assert_array_equal(S.text_rope_positions(3), np.array(ts["rope_positions_scale_frame_row_col_first3"]))

    cols = table["step_columns"]
    assert set(cols) <= STEP_COLUMNS, f"unknown columns {set(cols) - STEP_COLUMNS}"
    steps = sched.steps()
    assert len(steps) == len(table["steps"])
    for st_obj, row in zip(steps, table["steps"]):
        want = dict(zip(cols, row))
        got = _step_row(st_obj, text_len, rel["cfg"])
        assert {c: got[c] for c in cols} == want, f"{name} step {want['step']}"

    uph, upw = sched.largest[1:]
    for ph, rows in table["rope_row_positions_by_ph"].items():
        assert S.normalized_positions(int(ph), uph).tolist() == rows
    for pw, cols_ in table["rope_col_positions_by_pw"].items():
        assert S.normalized_positions(int(pw), upw).tolist() == cols_
    assert sorted(int(k) for k in table["rope_row_positions_by_ph"]) == sorted({s[1] for s in sched.scales})

    tot = table["totals"]
    assert tot["n_scales"] == sched.num_scales
    assert tot["visual_steps"] == sched.num_steps == len(steps)
    assert tot["ar_steps_incl_text"] == sched.num_steps + 1
    assert tot["distinct_visual_tokens"] == sched.total_tokens
    assert tot["token_forwards_per_cfg_branch"] == sum(s.tokens for s in steps)
    assert tot["max_kv_len"] == max([text_len] + [s.ref_tokens + text_len + s.tokens for s in steps])
    assert tot["final_summed_codes_shape"] == [1, 64, *sched.latent_shape]


@pytest.mark.parametrize("group,name", _per_step_tables())
def test_per_step_table(d, group, name):
    _check_per_step_table(d[group][name], name)


# ------------------------------------------------------------------------------------------------------------------
# B_transformer: packed training schedules
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case_dir", case_params("B_transformer"))
def test_transformer_case_schedules(case_dir):
    meta, arrays = load_case(case_dir)
    ta = meta["train_args"]
    n = _num_scales(ta["pn"])
    packing = meta["packing"]
    vblocks = packing["visual_blocks"]
    block_base, weights_v, weights_vmax = {}, [], []
    base = 0
    for ex in meta["examples"]:
        block_base[ex["index"]] = base
        base += sum(1 for b in vblocks if b["example"] == ex["index"])

    rope_rows = []
    for ex in meta["examples"]:
        _, t, h, w = ex["latent_shape"]
        sched = S.resolve(_resolution_for(ta["pn"]), aspect=h / w, frames=S.video_frames_for(t), num_scales=n,
                          image_rep=ta["image_scale_repetition"], video_rep=ta["video_scale_repetition"],
                          semantic_scales=ta.get("semantic_scales", S.released("480p")["semantic_scales"]),
                          detail_scale_min_tokens=ta["detail_scale_min_tokens"], training=True,
                          strict_heads=False)
        assert sched.template == ex["template"]
        assert sched.scales_per_clip == ex["scales_per_clip"]
        assert _lists(sched.scales) == ex["schedule"]
        assert list(sched.largest) == ex["largest_scale"]
        starts = sched.real_sid_starts
        for sc in ex["scales"]:
            si = sc["si"]
            ctx = sched.context[si]
            assert _lists(sched.scales[si]) == sc["shape"]
            assert int(np.prod(sc["shape"])) == sc["tokens"]
            assert sched.reps[si] == sc["repetitions"]
            assert sc["real_sid"] == starts[si] + sc["select_repeat_idx"]
            detail = S.head_is_detail(*sc["shape"][1:], sched.detail_scale_min_tokens)
            assert ("detail" if detail else "semantic") == sc["head"] and sc["bits"] == (64 if detail else 16)
            assert ctx["clipid"] == sc["clip"] == si // n
            assert (ctx["frame_ss"], ctx["frame_ee"]) == (sc["frame_ss"], sc["frame_ee"])
            assert ctx["ref_sids"] == sc["ref_sids"]

        mine = [b for b in vblocks if b["example"] == ex["index"]]
        kept = [b["si"] for b in mine]
        remapped = S.remap_context(sched.context, kept)
        kept_rep = {sc["si"]: sc["select_repeat_idx"] for sc in ex["scales"]}
        for b, refs in zip(mine, remapped):
            si = b["si"]
            assert _lists(sched.scales[si]) == b["shape"]
            assert b["real_sid"] == starts[si] + kept_rep[si]
            assert b["rope_scale_pos"] == S.TEXT_MAXLEN + b["real_sid"]
            assert b["frame_ss"] == sched.context[si]["frame_ss"]
            assert b["ref_blocks"] == [block_base[ex["index"]] + r for r in refs]
            detail = S.head_is_detail(*b["shape"][1:], sched.detail_scale_min_tokens)
            assert b["head"] == ("detail" if detail else "semantic") and b["bits"] == (64 if detail else 16)
            weights_v.append(int(np.prod(b["shape"])))
            weights_vmax.append(int(np.prod(sched.largest)))
            rope_rows.append((b["offset"], visual_rope_positions_for(sched, si, kept_rep[si])))

    # Loss weights: un-normalised (float64, exact) and the normalised float32 array the trainer used.
    got_w = S.loss_weights_unnormalised(weights_v, weights_vmax, k=ta["reweight_loss_by_scale"],
                                        max_value=ta["max_reweight_value"])
    np.testing.assert_allclose(got_w, [b["loss_weight_unnormalised"] for b in vblocks], rtol=1e-13, atol=0)
    got_n = S.loss_weights(weights_v, weights_vmax, k=ta["reweight_loss_by_scale"], max_value=ta["max_reweight_value"])
    assert got_n.dtype == np.float32
    # A few fp32 ulps: torch's vectorised float32 sum adds the weights in another order than numpy (pub1: the
    # sum differs by 2 ulps, 209.16193 vs the correctly rounded 209.16196).
    np.testing.assert_allclose(got_n, arrays["scale_weight"], rtol=1e-6, atol=0)

    # RoPE positions: visual blocks, then one text block per caption, then pad rows (-1).
    rope_pos = arrays["rope_pos"]
    for offset, pos in rope_rows:
        np.testing.assert_array_equal(rope_pos[offset:offset + len(pos)], pos)
    text_blocks = [b for b in packing["blocks"] if b["kind"] == "text"]
    assert [b["length"] for b in text_blocks] == list(meta["text_lens"])
    for b in text_blocks:
        np.testing.assert_array_equal(rope_pos[b["offset"]:b["offset"] + b["length"]],
                                      S.text_rope_positions(b["length"]))
    assert (rope_pos[packing["L_valid"]:] == -1).all()
    assert packing["L_visual"] == sum(weights_v)


def visual_rope_positions_for(sched: S.Schedule, si: int, rep: int) -> np.ndarray:
    return S.visual_rope_positions(sched.scales[si], sched.largest[1:], sched.real_sid_starts[si] + rep,
                                   sched.context[si]["frame_ss"])


# ------------------------------------------------------------------------------------------------------------------
# C_sampling: the sampler's schedule, step by step
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case_dir", case_params("C_sampling"))
def test_sampling_case_schedules(case_dir):
    meta, _ = load_case(case_dir)
    sa = meta["sampler_args"]
    sched = S.resolve(_resolution_for(sa["pn"]), aspect=sa["h_div_w_request"], frames=sa["num_frames"],
                      num_scales=_num_scales(sa["pn"]), image_rep=sa["image_scale_repetition"],
                      video_rep=sa["video_scale_repetition"], semantic_scales=sa["semantic_scales"],
                      detail_scale_min_tokens=sa["detail_scale_min_tokens"], tau_image=sa["tau_image"],
                      tau_video=sa["tau_video"])
    assert sched.template == sa["h_div_w_template"]
    assert sched.latent_frames == sa["latent_frames"] == S.latent_frames(sa["num_frames"])
    if sa.get("duration_s") is not None:
        assert S.resolve(_resolution_for(sa["pn"]), aspect=sa["h_div_w_request"], duration=sa["duration_s"],
                         num_scales=_num_scales(sa["pn"]), image_rep=sa["image_scale_repetition"],
                         video_rep=sa["video_scale_repetition"], semantic_scales=sa["semantic_scales"],
                         detail_scale_min_tokens=sa["detail_scale_min_tokens"]).scales == sched.scales
    assert _lists(sched.scales) == meta["scale_schedule"]
    assert list(sched.tau) == meta["tau_list"]
    assert list(sched.pixel_hw) == meta["pixel_size"]
    assert sched.num_frames == meta["output_frames"]
    for si, c in meta["context_info"].items():
        ours = sched.context[int(si)]
        assert {k: ours[k] for k in c} == c, si
    gt_leak = sa["gt_leak"]
    if meta.get("mode") in ("t2v", "t2i", "i2v"):
        assert [s.si < sched.gt_leak(meta["mode"]) for s in sched.steps()] == [r["leaked_gt"] for r in meta["steps"]]
    steps = sched.steps()
    assert len(steps) == meta["n_steps"] == len(meta["steps"])
    for st, row in zip(steps, meta["steps"]):
        got = {
            "k": st.index, "si": st.si, "repeat_idx": st.rep, "real_sid": st.real_sid,
            "rope_scale_pos": S.TEXT_MAXLEN + st.real_sid, "pn": list(st.shape), "tokens": st.tokens,
            "head": "detail" if st.head_detail else "semantic", "d": st.bits, "tau": st.tau,
            "last_repetition_step": st.last_rep, "clip": st.clip, "frame_ss": st.frame_ss, "frame_ee": st.frame_ee,
            "ref_sids": list(st.ref_sids), "kv_len": st.ref_tokens + meta["text_len"] + st.tokens,
            "target_pn": list(st.accum_shape), "leaked_gt": st.si < gt_leak,
        }
        assert st.head_detail == st.detail
        assert got == {k: row[k] for k in got}, f"step {row['k']}"


# ------------------------------------------------------------------------------------------------------------------
# SPEC figures: var-len outcomes, loss weights, Appendix A totals
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("res,duration,want", [
    ("480p", 5, [3899, 7919, 17919, 29439, 38559, 39719]),
    ("720p", 5, [7499, 11519, 21519, 33039, 42159, 43319]),
    ("480p", 10, [3899, 7919, 17919, 29439, 38559, 49719, 47410, 47410, 44910, 54030, 65190]),
])
def test_var_len_outcome_lengths(res, duration, want):
    """SPEC §7.3 'resulting visual lengths' (16:9)."""
    sched = S.resolve(res, duration=duration)
    outs = S.var_len_outcomes(sched.num_clips, sched.scales_per_clip)
    vol = [int(np.prod(s)) for s in sched.scales]
    assert [sum(vol[i] for i in o) for o in outs] == want
    for o in outs:  # every kept scale's reference is kept too
        assert len(S.remap_context(sched.context, o)) == len(o)


def test_var_len_720p_drop_last_scale():
    n = 15
    outs = S.var_len_outcomes(2, n, drop_720p_last_scale=True)
    assert all(2 * n - 1 not in o for o in outs)  # the (20,45,80) scale is never trained (SPEC §9.15)
    outs = S.var_len_outcomes(2, n, drop_720p_last_scale=False)
    assert outs[-2:] == [[n - 1, n + 13], [n - 1, n + 14]]
    p = S.var_len_probabilities([60, 20, 10, 6, 2, 1, 1], len(outs))
    assert p.dtype == np.float32 and abs(float(p.sum()) - 1) < 1e-6


def test_loss_weights_formula():
    """SPEC §7.6 against a direct loop; k=0 is token-count weighting."""
    vols = [1, 6, 8, 15, 20, 120, 31800]
    vmax = 31800
    want = [v * min(40.0, (vmax / v) ** (1 / 5)) for v in vols]
    np.testing.assert_allclose(S.loss_weights_unnormalised(vols, vmax), want, rtol=1e-14)
    assert S.loss_weights_unnormalised([1], 10 ** 9)[0] == 40.0  # clipped
    np.testing.assert_allclose(S.loss_weights(vols, vmax, k=0), np.array(vols) / sum(vols), rtol=1e-6)
    assert abs(float(S.loss_weights(vols, vmax).sum()) - 1) < 1e-6


@pytest.mark.parametrize("res,duration,scales,steps,tokens,forwards", [
    ("480p", 5, 28, 81, 81879, 161397), ("720p", 5, 30, 85, 157479, 244197), ("480p", 10, 42, 120, 159859, 311097),
    ("480p", 0, 14, 42, 3899, None), ("720p", 0, 15, 45, 7499, None), ("720p", 10, 45, 125, 307459, None),
])
def test_spec_totals(res, duration, scales, steps, tokens, forwards):
    sched = S.resolve(res, "16:9", duration)
    assert (sched.num_scales, sched.num_steps, sched.total_tokens) == (scales, steps, tokens)
    if forwards is not None:
        assert sum(s.tokens for s in sched.steps()) == forwards


def test_square_totals():
    assert S.resolve("480p", "1:1", 5).total_tokens == 81984
    assert S.resolve("720p", "1:1", 5).total_tokens == 157584


# ------------------------------------------------------------------------------------------------------------------
# The user-facing request and its errors
# ------------------------------------------------------------------------------------------------------------------


def test_resolve_requests():
    a = S.resolve("480p", "16:9", 5)
    assert a.pixel_hw == (480, 848) and a.num_frames == 81 and a.latent_frames == 21 and a.template == 0.562
    assert S.resolve("0.40M", "16:9", 5) == a
    assert S.resolve("480p", frames=81, height=480, width=848) == a
    assert S.resolve("480p", 9 / 16) == a
    assert S.resolve("720p", height=720, width=1280).pixel_hw == (720, 1280)
    assert S.resolve("480p", "9:16").template == 1.777
    img = S.resolve("480p", "1:1", duration=0)
    assert img.is_image and img.pixel_hw == (640, 640) and img.num_frames == 1 and img.tau == (1.0,) * 14
    assert S.resolve("480p", "1:1", frames=1) == img
    tiny = S.resolve("480p", "16:9", 10, num_scales=4)
    assert tiny.reps == (3, 3, 3, 3) + (3, 3, 2, 1) * 2 and tiny.pixel_hw == (48, 80)
    one_s = S.resolve("720p", duration=1)
    assert one_s.scales[-1] == (4, 45, 80) and one_s.context[-1]["frame_ee"] == 5
    assert S.resolve("480p", duration=5).gt_leak("i2v") == 14
    assert S.resolve("480p", duration=10).gt_leak("v2v") == 28


@pytest.mark.parametrize("kwargs,match", [
    (dict(resolution="1080p"), r"unknown resolution '1080p'.*480p"),
    (dict(aspect="wide"), r"cannot parse aspect 'wide'.*16:9"),
    (dict(aspect=-1.0), r"aspect"),
    (dict(frames=80), r"4k\+1"),
    (dict(frames=5), r"2 latent frames.*no schedule"),
    (dict(duration=2.5), r"whole number of seconds"),
    (dict(duration=-1), r"whole number of seconds"),
    (dict(duration=6), r"partial clip.*161"),
    (dict(resolution="720p", duration=7), r"partial clip"),
    (dict(frames=97), r"partial clip"),
    (dict(height=480), r"both height and width"),
    (dict(aspect="16:9", height=480, width=848), r"either aspect or height/width"),
    (dict(semantic_scales=5), r"disagree on scales"),
    (dict(image_rep=[3] * 13), r"image_rep has 13 entries.*14"),
    (dict(video_rep=[3] * 14 + [1]), r"video_rep has 15 entries"),
    (dict(num_scales=16), r"num_scales"),
])
def test_resolve_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        S.resolve(**kwargs)


def test_training_accepts_partial_last_clip():
    sched = S.resolve("480p", duration=6, training=True)
    assert sched.scales[-1] == (4, 30, 53) and sched.num_clips == 3
    assert sched.context[-1]["frame_ss"] == 21 and sched.context[-1]["frame_ee"] == 25


def test_low_level_errors():
    with pytest.raises(ValueError, match=r"pt=3.*supported"):
        S.scale_schedule(0.562, 14, 3)
    with pytest.raises(ValueError, match=r"unknown h/w template 0.5625.*0.562"):
        S.scale_schedule(0.5625, 14, 1)
    with pytest.raises(ValueError, match=r"4k\+1"):
        S.latent_frames(80)
    with pytest.raises(ValueError, match=r"whole 20-latent-frame clips"):
        S.pt2scale_schedule(0.562, 14, 100)
    with pytest.raises(ValueError, match=r"image-only"):
        S.var_len_outcomes(1, 14)
    with pytest.raises(ValueError, match=r"beyond the 28-scale schedule"):
        S.var_len_outcomes(2, 14, drop_720p_last_scale=False)
    with pytest.raises(ValueError, match=r"at least 2 video clips"):
        S.resolve("480p", duration=5).gt_leak("v2v")
    with pytest.raises(ValueError, match=r"not kept"):
        S.remap_context(S.resolve("480p", duration=5).context, [14, 15])
    with pytest.raises(ValueError, match=r"no released settings"):
        S.released("0.25M")
    assert S.latent_frames(1) == 1 and S.latent_frames(161) == 41
