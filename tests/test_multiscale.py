"""Multi-scale residual BSQ + self-correction against the reference's golden tokenisations (A_tokenizer model cases,
B_transformer training-step cases), plus BSQ unit tests and statistical checks of PRNG-drawn flips."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from goldens import case_params, load_case
from infstar_jax import schedules
from infstar_jax.tokenizer.bsq import bits_to_codes, bsq_aux_losses, bsq_quantize
from infstar_jax.tokenizer.multiscale import (
    Plan,
    accumulate,
    codes_from_bits,
    encode,
    encode_self_correct,
    init_accumulator,
    next_input,
    sample_flip_probs,
)

ATOL = 1e-6  # fp32 codes / accumulators / transformer inputs (A_tokenizer README); bits exact


def to_cl(x):
    """torch (B, C, T, H, W) -> channels-last (B, T, H, W, C)."""
    return np.moveaxis(np.asarray(x), 1, -1)


@functools.partial(jax.jit, static_argnames=("plan", "return_intermediates"))
def jit_encode(latent, plan, flip_masks=None, return_intermediates=False):
    return encode(latent, plan, flip_masks, return_intermediates=return_intermediates)


def model_cases():
    """A_tokenizer case folders of tokenizer models (`meta.steps`); the resampling-op case is test_resample.py's."""
    params = case_params("A_tokenizer")
    picked = [p for p in params
              if p.values[0] is None or "steps" in json.loads((p.values[0] / "meta.json").read_text())]
    return picked or [pytest.param(None, id="A_tokenizer-no-model-case")]


def per_scale_reps(n_scales, scales_per_clip, image_rep, video_rep):
    return [image_rep[si] if si < scales_per_clip else video_rep[si % scales_per_clip] for si in range(n_scales)]


def plan_of_tokenizer_case(meta) -> Plan:
    sched = meta["schedule"]
    args = meta["global_args"]
    scales = [tuple(s) for s in sched["scale_schedule"]]
    n = sched["scales_in_one_clip"]
    reps = per_scale_reps(len(scales), n, args["image_scale_repetition"], args["video_scale_repetition"])
    return Plan.from_schedule(
        scales, reps, n, args["detail_scale_min_tokens"], args["frames_inner_clip"],
        semantic_dim=args["semantic_scale_dim"], detail_dim=args["detail_scale_dim"],
        latent_dim=meta["latent_shape"][1], noise_apply_layers=args["noise_apply_layers"],
    )


# ---------------------------------------------------------------------------------------------------------------
# A_tokenizer: every step's intermediates of the clean (infer-mode) tokenisation
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.golden
@pytest.mark.tokenizer
@pytest.mark.parametrize("case_dir", model_cases())
def test_tokenizer_case_multiscale(case_dir):
    meta, arrays = load_case(case_dir)
    plan = plan_of_tokenizer_case(meta)

    # The plan's step table is the reference's.
    assert len(plan.steps) == len(meta["steps"])
    for step, ref in zip(plan.steps, meta["steps"]):
        si = ref["si"]
        assert (step.index, step.si, step.rep) == (ref["step"], si, ref["rep"])
        assert plan.scales[si] == (ref["pt"], ref["ph"], ref["pw"])
        assert plan.clips[si] == ref["clip"] and plan.frames[si] == tuple(ref["frames"])
        assert plan.bits[si] == ref["bits"] and plan.detail[si] == (ref["head"] == "detail")
        assert plan.self_correct[si] == ref["requant"]
    for si, info in meta["schedule"]["pack_info"].items():
        assert plan.frames[int(si)] == (info["frame_ss"], info["frame_ee"])
        assert plan.clips[int(si)] == info["clipid"]

    latent = to_cl(arrays["latent"])
    res = jit_encode(latent, plan, return_intermediates=True)
    inter = res.intermediates
    failures = []

    def check(name, got, want, exact=False):
        got = np.asarray(got)
        if got.shape != want.shape:
            failures.append(f"{name}: shape {got.shape} != {want.shape}")
        elif exact and not np.array_equal(got, want):
            failures.append(f"{name}: {(got != want).sum()} of {got.size} differ")
        elif not exact and np.abs(got.astype(np.float64) - want).max() > ATOL:
            failures.append(f"{name}: max |diff| {np.abs(got.astype(np.float64) - want).max():.3g}")

    for step in plan.steps:
        k = step.index
        pre = f"ms/step{k:02d}/"
        if pre + "cum_init" in arrays.files:
            first_si = plan.clip_scales(plan.clips[step.si])[0]
            cum_init = arrays[pre + "cum_init"]
            assert cum_init.shape == (latent.shape[0], plan.latent_dim, *plan.scales[first_si]) and not cum_init.any()
        check(pre + "cum_before", inter["cum_before"][k], to_cl(arrays[pre + "cum_before"]))
        check(pre + "x_in", res.x_in[k], to_cl(arrays[pre + "x_in"]))
        check(pre + "residual", inter["residual"][k], to_cl(arrays[pre + "residual"]))
        check(pre + "residual_down", inter["residual_down"][k], to_cl(arrays[pre + "residual_down"]))
        check(pre + "q_raw", inter["q_raw"][k], to_cl(arrays[pre + "q_raw"]))
        check(pre + "bits", res.bits[k], arrays[pre + "bits"], exact=True)
        check(pre + "bits(used)", res.used_bits[k], arrays[pre + "bits"], exact=True)
        if plan.self_correct[step.si]:
            check(pre + "q", res.codes[k], to_cl(arrays[pre + "q"]))
        else:
            assert pre + "q" not in arrays.files
            check(pre + "q_raw(accumulated)", res.codes[k], to_cl(arrays[pre + "q_raw"]))
        check(pre + "up", inter["up"][k], to_cl(arrays[pre + "up"]))
    for c in range(plan.num_clips):
        check(f"ms/clip{c}_summed_codes", res.clip_codes[c], to_cl(arrays[f"ms/clip{c}_summed_codes"]))
    check("summed_codes", res.summed_codes, to_cl(arrays["summed_codes"]))
    golden_bits = [jnp.asarray(arrays[f"ms/step{s.index:02d}/bits"]) for s in plan.steps]
    rebuilt = jax.jit(codes_from_bits, static_argnames="plan")(golden_bits, plan=plan)
    check("summed_codes(codes_from_bits)", rebuilt, to_cl(arrays["summed_codes"]))
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------------------------
# B_transformer: self-corrected tokenisation of every example (recorded flip masks)
# ---------------------------------------------------------------------------------------------------------------


def plan_of_example(meta, ex) -> Plan:
    args = meta["train_args"]
    return Plan.from_schedule(
        [tuple(s) for s in ex["schedule"]], [s["repetitions"] for s in ex["scales"]], ex["scales_per_clip"],
        args["detail_scale_min_tokens"], args["frames_inner_clip"],
        semantic_dim=args["semantic_scale_dim"], detail_dim=args["detail_scale_dim"],
        latent_dim=ex["latent_shape"][0], noise_apply_layers=args["noise_apply_layers"],
    )


@pytest.mark.golden
@pytest.mark.tokenizer
@pytest.mark.parametrize("case_dir", case_params("B_transformer"))
def test_transformer_case_self_correction(case_dir):
    meta, arrays = load_case(case_dir)
    calls = meta["self_correction"]["calls"]
    blocks = {(b["example"], b["si"]): (j, b) for j, b in enumerate(meta["packing"]["visual_blocks"])}
    x_blc = arrays["x_BLC"][0]
    n_checked_blocks = 0
    for ex in meta["examples"]:
        e = ex["index"]
        plan = plan_of_example(meta, ex)
        for sc in ex["scales"]:
            si = sc["si"]
            assert plan.scales[si] == tuple(sc["shape"]) and plan.clips[si] == sc["clip"]
            assert plan.frames[si] == (sc["frame_ss"], sc["frame_ee"])
            assert plan.bits[si] == sc["bits"] and plan.detail[si] == (sc["head"] == "detail")
            assert plan.self_correct[si] == all(r["bsc_call"] is not None for r in sc["reps"])

        masks = [None] * plan.num_steps
        clean = {}
        for call in (c for c in calls if c["example"] == e):
            k = plan.step_index(call["si"], call["repetition"])
            shape = plan.bits_shape(call["si"], 1)
            assert tuple(call["shape_bthwd"]) == shape
            mask = arrays[f"bsc_mask_{call['call']:03d}"].reshape(shape).astype(bool)
            assert int(mask.sum()) == call["n_flipped"]
            masks[k] = mask
            clean[k] = arrays[f"bsc_bits_{call['call']:03d}"].reshape(shape)
        # Every repetition of every tokenised scale but the schedule's last was self-corrected, and nothing else.
        want_calls = [plan.step_index(sc["si"], r) for sc in ex["scales"] if plan.self_correct[sc["si"]]
                      for r in range(sc["repetitions"])]
        assert sorted(clean) == sorted(want_calls)

        latent = np.moveaxis(arrays[f"latent_{e}"], 0, -1)[None]
        res = jit_encode(latent, plan, masks)
        for k, want in clean.items():
            np.testing.assert_array_equal(np.asarray(res.bits[k]), want, err_msg=f"example {e} step {k}: clean bits")
            np.testing.assert_array_equal(
                np.asarray(res.used_bits[k]), want ^ masks[k].astype(np.uint8), err_msg=f"example {e} step {k}: flips"
            )
        for sc in ex["scales"]:
            if (e, sc["si"]) not in blocks:
                continue  # scale not packed (var-len selection)
            j, block = blocks[(e, sc["si"])]
            k = plan.step_index(sc["si"], sc["select_repeat_idx"])
            rows = x_blc[block["offset"] : block["offset"] + block["length"]]
            np.testing.assert_allclose(
                np.asarray(res.x_in[k]).reshape(-1, plan.latent_dim), rows, rtol=0, atol=ATOL,
                err_msg=f"example {e} scale {sc['si']}: x_in vs x_BLC",
            )
            np.testing.assert_array_equal(
                np.asarray(res.bits[k]).reshape(-1, plan.bits[sc["si"]]), arrays[f"gt_{j:03d}"],
                err_msg=f"example {e} scale {sc['si']}: bits vs gt_{j:03d}",
            )
            n_checked_blocks += 1
    assert n_checked_blocks == len(blocks)


# ---------------------------------------------------------------------------------------------------------------
# Plan vs schedules.py, flips, sampler pieces, BSQ
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.tokenizer
@pytest.mark.parametrize(
    "template,num_scales,pt", [(0.562, 14, 21), (0.562, 14, 41), (0.562, 15, 21), (1.0, 14, 1), (0.494, 4, 33)]
)
def test_plan_agrees_with_schedules(template, num_scales, pt):
    sched = schedules.scale_schedule(template, num_scales, pt)
    n = schedules.scales_per_clip_of(sched)
    image_rep, video_rep = schedules.default_repetitions(n)
    reps = schedules.repetitions(sched, n, image_rep, video_rep)
    plan = Plan.from_schedule(sched, reps, n, 350)
    for si, info in enumerate(schedules.context_info(sched, n)):
        assert plan.clips[si] == info["clipid"]
        assert plan.frames[si] == (info["frame_ss"], info["frame_ee"])
        assert plan.detail[si] == schedules.head_is_detail(*sched[si][1:], 350)
    starts = schedules.real_sid_starts(reps)
    assert [plan.step_index(si, 0) for si in range(len(sched))] == starts
    assert plan.latent_frames == pt and plan.self_correct == tuple(si < len(sched) - 1 for si in range(len(sched)))


def small_plan():
    # image pyramid (1,1)(2,3)(3,4) + one clip of 4 latent frames; semantic below 6 tokens
    scales = [(1, 1, 1), (1, 2, 3), (1, 3, 4), (4, 1, 1), (4, 2, 3), (4, 3, 4)]
    return Plan.from_schedule(scales, [3, 2, 2, 2, 2, 1], 3, 6)


def small_latent(plan, seed=0, batch=2):
    shape = (batch, plan.latent_frames, *plan.full_hw, plan.latent_dim)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.tokenizer
def test_prng_flips_hit_the_rate_and_leave_labels_alone():
    plan = small_plan()
    latent = small_latent(plan)
    p = 0.2
    probs = jnp.full((plan.num_steps,), p)
    run = jax.jit(encode_self_correct, static_argnames="plan")
    res = run(latent, plan, jax.random.key(0), probs)
    clean = jit_encode(latent, plan)
    flipped = total = 0
    for s in plan.steps:
        diff = np.asarray(res.used_bits[s.index]) != np.asarray(res.bits[s.index])
        if plan.self_correct[s.si]:
            flipped += int(diff.sum())
            total += diff.size
            want_codes = np.where(np.asarray(res.used_bits[s.index]) > 0, 1.0, -1.0) / np.sqrt(plan.bits[s.si])
            np.testing.assert_array_equal(np.asarray(res.codes[s.index]), want_codes)
        else:
            assert not diff.any(), "the schedule's last scale must never be flipped"
    sd = np.sqrt(total * p * (1 - p))
    assert abs(flipped - total * p) < 5 * sd, (flipped, total * p, sd)
    # The first step's label and input precede every flip; later labels see the flipped accumulator.
    np.testing.assert_array_equal(np.asarray(res.bits[0]), np.asarray(clean.bits[0]))
    assert any(not np.array_equal(np.asarray(res.bits[k]), np.asarray(clean.bits[k])) for k in range(1, plan.num_steps))
    # Zero probability == no flips, and the draw is a deterministic function of the key.
    zero = run(latent, plan, jax.random.key(0), jnp.zeros((plan.num_steps,)))
    for a, b in zip(zero.used_bits, clean.bits):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    again = run(latent, plan, jax.random.key(0), probs)
    np.testing.assert_array_equal(np.asarray(again.summed_codes), np.asarray(res.summed_codes))


@pytest.mark.tokenizer
def test_flip_at_one_step_changes_only_later_steps():
    plan = small_plan()
    latent = small_latent(plan, seed=1)
    clean = jit_encode(latent, plan)
    k = plan.step_index(1, 0)
    mask = np.zeros(plan.bits_shape(1, 2), bool)
    mask[0, 0, 1, 2, ::3] = True
    mask[1, 0, 0, 0, :5] = True
    masks = [None] * plan.num_steps
    masks[k] = mask
    res = jit_encode(latent, plan, masks)
    for j in range(k + 1):  # labels and inputs up to and including the flipped step are the clean ones
        np.testing.assert_array_equal(np.asarray(res.bits[j]), np.asarray(clean.bits[j]))
        np.testing.assert_array_equal(np.asarray(res.x_in[j]), np.asarray(clean.x_in[j]))
    np.testing.assert_array_equal(np.asarray(res.used_bits[k]), np.asarray(clean.bits[k]) ^ mask.astype(np.uint8))
    assert not np.array_equal(np.asarray(res.x_in[k + 1]), np.asarray(clean.x_in[k + 1]))
    # The next clip restarts from zero: its first step is untouched by clip 0's flip.
    first_video = plan.step_index(3, 0)
    np.testing.assert_array_equal(np.asarray(res.bits[first_video]), np.asarray(clean.bits[first_video]))
    # The accumulated codes are exactly what codes_from_bits rebuilds from the used bits.
    rebuilt = jax.jit(codes_from_bits, static_argnames="plan")(res.used_bits, plan=plan)
    np.testing.assert_allclose(np.asarray(rebuilt), np.asarray(res.summed_codes), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="last scale"):
        bad = [None] * plan.num_steps
        bad[-1] = np.ones(plan.bits_shape(plan.num_scales - 1, 2), bool)
        encode(latent, plan, bad)


@pytest.mark.tokenizer
def test_sampler_pieces_reproduce_encode():
    """The per-step API (init_accumulator / next_input / accumulate) gives encode's inputs from its bits."""
    plan = small_plan()
    latent = small_latent(plan, seed=2)
    res = jit_encode(latent, plan)

    @jax.jit
    def replay(bits):
        x_ins, clips = [], []
        for clip in range(plan.num_clips):
            cum = init_accumulator(plan, clip, latent.shape[0])
            for s in (s for s in plan.steps if plan.clips[s.si] == clip):
                x_ins.append(next_input(cum, plan.scales[s.si]))
                cum = accumulate(cum, bits[s.index])
            clips.append(cum)
        return x_ins, clips

    x_ins, clips = replay(res.bits)
    for got, want in zip(x_ins + clips, res.x_in + res.clip_codes):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)


@pytest.mark.tokenizer
def test_sample_flip_probs_follow_the_reference_rule():
    plan = small_plan()
    probs = np.asarray(sample_flip_probs(jax.random.key(3), plan, 0.3))
    sc = np.array([plan.self_correct[s.si] for s in plan.steps])
    assert probs.shape == (plan.num_steps,) and np.all(probs[~sc] == 0)
    many = np.stack([np.asarray(sample_flip_probs(jax.random.key(i), plan, 0.3)) for i in range(200)])[:, sc]
    hundredths = np.round(many * 100)
    np.testing.assert_allclose(many * 100, hundredths, atol=1e-4)
    assert hundredths.min() == 0 and hundredths.max() == 30
    assert np.all(np.asarray(sample_flip_probs(jax.random.key(0), plan, -1.0)) == 0)


@pytest.mark.tokenizer
def test_plan_rejects_bad_input():
    with pytest.raises(ValueError, match="whole number of clips"):
        Plan.from_schedule([(1, 1, 1), (1, 2, 2), (4, 1, 1)], [1, 1, 1], 2, 4)
    with pytest.raises(ValueError, match="reps"):
        Plan.from_schedule([(1, 1, 1), (1, 2, 2)], [1], 2, 4)
    plan = small_plan()
    with pytest.raises(ValueError, match="latent must be"):
        encode(np.zeros((1, plan.latent_frames + 1, *plan.full_hw, 64), np.float32), plan)


# ---------------------------------------------------------------------------------------------------------------
# BSQ
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.tokenizer
@pytest.mark.parametrize("d", [16, 64])
def test_bsq_quantize_and_bits_to_codes(d):
    x = np.random.default_rng(d).standard_normal((3, 5, d)).astype(np.float32)
    x[0, 0, :4] = 0.0  # an exact zero quantises to bit 0
    codes, bits = bsq_quantize(x)
    want_bits = (x > 0).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(bits), want_bits)
    assert bits.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(bits_to_codes(bits)), np.where(want_bits > 0, 1.0, -1.0) / np.sqrt(d))
    np.testing.assert_allclose(np.asarray(codes), np.asarray(bits_to_codes(bits)), rtol=0, atol=1e-7)
    # straight-through: d(sum(codes * w))/dx = d(sum(l2norm(x) * w))/dx
    w = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    g = jax.grad(lambda v: jnp.sum(bsq_quantize(v)[0] * w))(x)
    g_ref = jax.grad(lambda v: jnp.sum(v / jnp.linalg.norm(v, axis=-1, keepdims=True) * w))(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-5, atol=1e-6)


def _aux_losses_numpy(x, inv_t=100.0):
    """Direct float64 transcription of SPEC §4.6 (multiscale_bsq_tp_absorb_patchify.py BSQ.forward, training mode)."""
    d = x.shape[-1]
    x = x.reshape(-1, d).astype(np.float64)
    u = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    q = np.where(u > 0, 1.0, -1.0) / np.sqrt(d)
    p = 1.0 / (1.0 + np.exp(4 * u / np.sqrt(d) * inv_t))
    prob = np.stack([p, 1 - p], -1)
    ent = lambda t: -(t * np.log(t + 1e-8)).sum(-1)  # noqa: E731
    h_ps = ent(prob).sum(-1).mean()
    h_cb = ent(prob.mean(0)).sum()
    commit = ((u - q) ** 2).mean()
    return {"per_sample_entropy": h_ps, "codebook_entropy": h_cb, "commitment": commit,
            "aux_loss": 0.25 * commit + (h_ps - h_cb) / inv_t * 0.1}


@pytest.mark.tokenizer
@pytest.mark.parametrize("d,scale", [(16, 1.0), (64, 0.01)])
def test_bsq_aux_losses_match_formula(d, scale):
    x = (np.random.default_rng(7).standard_normal((2, 3, 4, 5, d)) * scale).astype(np.float32)
    codes, _ = bsq_quantize(x)
    got = jax.jit(bsq_aux_losses)(x, codes)
    want = _aux_losses_numpy(x)
    for name, v in want.items():
        np.testing.assert_allclose(float(got[name]), v, rtol=2e-5, atol=1e-6, err_msg=name)
