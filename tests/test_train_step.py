"""The transformer train step and host batching: self-correction flips and clean labels, packed inputs, placeholder
rows, gradient accumulation, EMA, optimizer, one sharded step on 8 devices == one device, var-len outcomes, batch
plans and text buckets."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from infstar_jax import parallel, schedules
from infstar_jax.tokenizer import multiscale
from infstar_jax.training import batching, state as state_lib, step as step_lib
from infstar_jax.transformer.config import TransformerConfig
from infstar_jax.transformer.model import init_params

pytestmark = pytest.mark.training

CFG = TransformerConfig(depth=1, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64, text_dim=16,
                        text_maxlen=16)
OPTS = batching.PackingOptions(resolution="480p", num_scales=3, image_rep=(2, 2, 2), video_rep=(2, 2, 1),
                               semantic_scales=2, detail_scale_min_tokens=9, var_len=False, text_buckets=(8, 16),
                               pad_to_multiple=16, text_dim=CFG.text_dim, text_maxlen=CFG.text_maxlen)


def shape_for(rows, opts=OPTS, pt=5, kept=None, text_slot=8):
    sched = batching.resolve_schedule(opts, 1.0, pt)
    kept = tuple(range(sched.num_scales)) if kept is None else kept
    return batching.step_shape(opts, sched, kept, text_slot, rows)


def host_batch(shape, seed, rows=None, placeholders=(), opts=OPTS):
    """Host arrays of ``rows`` random rows (latents with a per-channel bias so the bits are learnable)."""
    rng = np.random.default_rng(seed)
    t, h, w, c = shape.latent_shape
    out = []
    for r in range(shape.rows if rows is None else rows):
        if r in placeholders:
            out.append(batching.row_arrays(shape, None, None, rng, opts))
            continue
        latent = (0.5 + rng.normal(size=(t, h, w, c))).astype(np.float32)
        text = rng.normal(size=(int(rng.integers(3, shape.text_slot + 1)), opts.text_dim)).astype(np.float32)
        out.append(batching.row_arrays(shape, latent, text, rng, opts))
    return batching.stack_rows(out)


# ---- self-correction ----------------------------------------------------------------------------------------------


def test_self_correction_flips_at_the_drawn_rate_and_labels_stay_clean():
    shape = shape_for(rows=8)
    plan = shape.plan
    rng = np.random.default_rng(0)
    latent = jnp.asarray(rng.normal(size=(8, *shape.latent_shape)).astype(np.float32))
    probs = rng.integers(0, 31, size=(8, plan.num_steps)).astype(np.float32) * 0.01
    keys = jax.random.split(jax.random.key(3), 8)
    enc = jax.jit(lambda l, p, k: step_lib.encode_rows(l, p, k, plan))(latent, jnp.asarray(probs), keys)

    flipped_total, expected_total, variance = 0, 0.0, 0.0
    for s in plan.steps:
        flips = np.asarray(enc.used_bits[s.index]) != np.asarray(enc.bits[s.index])  # [B, pt, ph, pw, d]
        if not plan.self_correct[s.si]:
            assert s.si == len(shape.scales) - 1 and not flips.any(), "the schedule's last scale is never flipped"
            continue
        n = flips[0].size
        for b in range(8):
            p = probs[b, s.index]
            k = int(flips[b].sum())
            flipped_total += k
            expected_total += p * n
            variance += p * (1 - p) * n
            if n >= 500:  # per step and row where the count is informative: within 5 sigma
                assert abs(k - p * n) <= 5 * np.sqrt(p * (1 - p) * n) + 1, (s, b, k, p, n)
            if p == 0:
                assert k == 0
    assert abs(flipped_total - expected_total) <= 4 * np.sqrt(variance), (flipped_total, expected_total)

    # Labels are the clean bits of the residual w.r.t. the *flipped* accumulator: re-encoding with exactly these flip
    # masks reproduces inputs and labels; without flips the later labels differ (they correct the injected errors).
    masks = [np.asarray(enc.used_bits[s.index]) != np.asarray(enc.bits[s.index]) if plan.self_correct[s.si] else None
             for s in plan.steps]
    again = multiscale.encode(latent, plan, flip_masks=masks)
    clean = multiscale.encode(latent, plan)
    for s in plan.steps:
        np.testing.assert_array_equal(enc.bits[s.index], again.bits[s.index])
        np.testing.assert_allclose(enc.x_in[s.index], again.x_in[s.index], atol=1e-6)
    assert any(not np.array_equal(enc.bits[s.index], clean.bits[s.index]) for s in plan.steps[1:])
    # Flipped positions: the accumulated bit is the opposite of the label.
    k = plan.steps[-2].index
    used, bits = np.asarray(enc.used_bits[k]), np.asarray(enc.bits[k])
    np.testing.assert_array_equal(used[masks[k]], 1 - bits[masks[k]])


def test_select_kept_packs_the_chosen_repetition():
    opts = dataclasses.replace(OPTS, var_len=True, var_len_outcomes=((0, 1, 2), (0, 1, 2, 4)), var_len_prob=(1, 1))
    shape = shape_for(rows=3, opts=opts, kept=(0, 1, 2, 4))
    plan = shape.plan
    assert plan.num_scales == 6  # the kept scale 4 is in clip 1: both clips are tokenised
    rng = np.random.default_rng(1)
    latent = jnp.asarray(rng.normal(size=(3, *shape.latent_shape)).astype(np.float32))
    probs = jnp.full((3, plan.num_steps), 0.1)
    enc = step_lib.encode_rows(latent, probs, jax.random.split(jax.random.key(0), 3), plan)
    rep = np.asarray([[0, 1, 1, 0], [1, 0, 0, 1], [1, 1, 0, 1]], np.int32)
    visual, labels = step_lib.select_kept(enc, shape, jnp.asarray(rep))
    assert visual.shape == (3, shape.visual_len, 64) and labels.shape == (3, shape.visual_len, 64)
    for b in range(3):
        off = 0
        for k, si in enumerate(shape.kept):
            s = plan.step_index(si, int(rep[b, k]))
            n = int(np.prod(plan.scales[si]))
            d = plan.bits[si]
            np.testing.assert_array_equal(visual[b, off: off + n], np.asarray(enc.x_in[s][b]).reshape(n, 64))
            np.testing.assert_array_equal(labels[b, off: off + n, :d], np.asarray(enc.bits[s][b]).reshape(n, d))
            assert not np.asarray(labels[b, off: off + n, d:]).any()
            off += n
    # the truncated plan cuts the latent to the clips it needs
    short = shape_for(rows=1, opts=opts, kept=(0, 1, 2))
    assert short.plan.num_scales == 3 and short.latent_shape[0] == 1
    assert short.plan.self_correct == (True, True, True)  # the image's last scale is not the schedule's last


# ---- host rows -----------------------------------------------------------------------------------------------------


def test_row_arrays():
    shape = shape_for(rows=1, text_slot=16)
    pk = shape.packing
    rng = np.random.default_rng(2)
    latent = rng.normal(size=(5, 3, 3, 64)).astype(np.float32)
    drops, n = 0, 400
    for i in range(n):
        text = np.ones((7, 16), np.float32)
        row = batching.row_arrays(shape, latent, text, np.random.default_rng([5, i]), OPTS)
        assert row["text"].shape == (16, 16) and not row["text"][7:].any()
        off = pk.text_offsets[0]
        assert row["key_valid"][off: off + 7].all() and not row["key_valid"][off + 7: off + 16].any()
        assert row["key_valid"][:off].all()
        np.testing.assert_array_equal(row["positions"], pk.positions([row["repeat_idx"]]))
        assert all(0 <= r < shape.reps[si] for r, si in zip(row["repeat_idx"], shape.kept))
        p = row["flip_probs"]
        assert np.allclose(p * 100, np.round(p * 100)) and p.max() <= 0.3 + 1e-6 and p[-1] == 0
        dropped = (row["uncond_rows"] >= 0).any()
        drops += dropped
        if dropped:
            np.testing.assert_array_equal(row["uncond_rows"][:7], np.arange(7))
            assert (row["uncond_rows"][7:] == -1).all()
        assert row["row_weight"] == 1.0
    assert abs(drops / n - OPTS.cond_drop) < 4 * np.sqrt(0.1 * 0.9 / n)
    ph = batching.row_arrays(shape, None, None, rng, OPTS)
    assert ph["row_weight"] == 0 and not ph["latent"].any() and not ph["flip_probs"].any()
    with pytest.raises(ValueError, match="text slot"):
        batching.row_arrays(shape, latent, np.ones((17, 16), np.float32), rng, OPTS)
    with pytest.raises(ValueError, match="does not fit the step shape"):
        batching.row_arrays(shape, latent[:, :2], np.ones((3, 16), np.float32), rng, OPTS)


def test_flip_probabilities_cover_zero_to_strength():
    plan = shape_for(rows=1).plan
    draws = np.stack([batching.flip_probabilities(plan, 0.3, np.random.default_rng(i)) for i in range(600)])
    on = np.asarray([plan.self_correct[s.si] for s in plan.steps])
    values = np.round(draws[:, on] * 100).astype(int)
    counts = np.bincount(values.ravel(), minlength=31)
    assert counts.size == 31 and counts.min() > 0  # every value 0.00..0.30 occurs
    assert abs(values.mean() - 15) < 0.5
    assert not draws[:, ~on].any()
    assert not batching.flip_probabilities(plan, -1.0, np.random.default_rng(0)).any()  # inference strength
    per_scale = batching.flip_probabilities(plan, [0.0] * 5 + [0.3], np.random.default_rng(0))
    assert not per_scale.any()  # only the last scale has strength, and it is never flipped


# ---- the step ------------------------------------------------------------------------------------------------------


def _state_and_step(mesh, grad_accum=1, ema=0.0, lr=1e-3):
    tx, schedule = state_lib.optimizer_from_config(dict(lr=lr, steps=10))
    init_fn = lambda: init_params(CFG, jax.random.key(0))["params"]  # noqa: E731
    state, shardings = state_lib.create_sharded(init_fn, tx, mesh, ema=ema > 0)
    step = step_lib.TrainStep(CFG, tx, schedule, step_lib.StepOptions(seed=4, grad_accum=grad_accum, ema_decay=ema),
                              mesh, shardings)
    return state, step


def _put(mesh, arrays):
    sh = NamedSharding(mesh, P(("data", "fsdp")))
    return {k: jax.device_put(v, sh) for k, v in step_lib.device_arrays(arrays).items()}


def _assert_trees_close(a, b, atol):
    flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    for path, x in jax.tree_util.tree_flatten_with_path(a)[0]:
        np.testing.assert_allclose(np.asarray(x), np.asarray(flat_b[path]), atol=atol, rtol=0,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow  # not a must-show; keeps the default suite under 15 min on 2 cores
def test_accumulation_placeholders_and_ema():
    mesh = parallel.make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        shape4 = shape_for(rows=4, pt=1)  # an image schedule keeps the three compilations short
        batch4 = host_batch(shape4, seed=7, placeholders=(1, 3))
        # Flip keys are drawn per row position; without flips rows 0 and 2 equal rows 0 and 1 of a 2-row batch.
        batch4["flip_probs"][:] = 0
        state4, step4 = _state_and_step(mesh, ema=0.9)
        p0 = jax.tree.map(np.asarray, state4.params)
        a, ma = step4(state4, shape4, _put(mesh, batch4))
        assert int(a.step) == 1 and float(ma["rows"]) == 2.0
        # EMA after one step: 0.9 * initial + 0.1 * updated
        _assert_trees_close(a.ema_params, jax.tree.map(lambda x, y: 0.9 * x + 0.1 * y, p0, a.params), 1e-6)

        # The two real rows alone (no placeholder rows) give the same update and metrics.
        shape2 = dataclasses.replace(shape4, rows=2)
        state2, step2 = _state_and_step(mesh, ema=0.9)
        b, mb = step2(state2, shape2, _put(mesh, {k: v[[0, 2]] for k, v in batch4.items()}))
        _assert_trees_close(a.params, b.params, 1e-6)
        for k in ("loss", "acc", "grad_norm", "block_loss", "block_acc"):
            np.testing.assert_allclose(ma[k], mb[k], rtol=1e-5, err_msg=k)

        # Two micro-batches (rows {0, 2} and {1, 3}) give the same step as one.
        state_acc, step_acc = _state_and_step(mesh, grad_accum=2, ema=0.9)
        c, mc = step_acc(state_acc, shape4, _put(mesh, batch4))
        _assert_trees_close(c.params, a.params, 1e-6)
        _assert_trees_close(c.opt_state, a.opt_state, 1e-6)
        for k in ("loss", "acc", "grad_norm", "block_loss", "block_acc"):
            np.testing.assert_allclose(mc[k], ma[k], rtol=1e-5, err_msg=k)
        assert step4.num_compiled == step2.num_compiled == step_acc.num_compiled == 1


@pytest.mark.sharding
def test_sharded_step_equals_single_device():
    shape = shape_for(rows=8)
    batch = host_batch(shape, seed=11, placeholders=(5,))
    one = parallel.make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
    with jax.set_mesh(one):
        state, step = _state_and_step(one)
        ref, ref_m = step(state, shape, _put(one, batch))
        ref = jax.tree.map(np.asarray, ref)
        ref_m = jax.tree.map(np.asarray, ref_m)
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with jax.set_mesh(mesh):
        state, step = _state_and_step(mesh)
        assert state.params["blocks"]["mlp"]["up_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
        assert state.opt_state[1][0].mu["blocks"]["mlp"]["up_proj"]["kernel"].sharding.spec == P(None, "fsdp",
                                                                                                  "tensor")
        head0 = np.asarray(state.params["head"]["kernel"])
        new, m = step(state, shape, _put(mesh, batch))
        assert new.params["blocks"]["mlp"]["up_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    _assert_trees_close(new.params, ref.params, 1e-5)
    _assert_trees_close(new.opt_state, ref.opt_state, 1e-5)
    for k in ("loss", "acc", "grad_norm", "block_loss", "block_acc"):
        np.testing.assert_allclose(m[k], ref_m[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert np.abs(np.asarray(new.params["head"]["kernel"]) - head0).max() > 0  # the step did update


# ---- optimizer -----------------------------------------------------------------------------------------------------


def test_optimizer_is_clipped_adamw():
    tx, schedule = state_lib.optimizer_from_config(dict(lr=0.1, steps=10, weight_decay=0.5, grad_clip=1.0))
    params = {"w": jnp.asarray([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.asarray([1.0, 1.0])}
    grads = {"w": jnp.asarray([[3.0, 0.0], [-4.0, 0.0]]), "b": jnp.asarray([0.0, 0.0])}
    opt = tx.init(params)
    upd, opt = tx.update(grads, opt, params)
    new = optax.apply_updates(params, upd)
    # by hand: clip to global norm 1, Adam step 1 (bias-corrected m/sqrt(v) = g/|g|), decoupled decay on matrices
    g = {k: np.asarray(v) / 5.0 for k, v in grads.items()}
    for k in params:
        m, v = 0.1 * g[k] / (1 - 0.9), 0.03 * g[k] ** 2 / (1 - 0.97)
        step = m / (np.sqrt(v) + 1e-8) + (0.5 * np.asarray(params[k]) if k == "w" else 0.0)
        np.testing.assert_allclose(new[k], np.asarray(params[k]) - 0.1 * step, rtol=1e-5, err_msg=k)
    warm = state_lib.lr_schedule(1.0, kind="cosine", warmup_steps=10, total_steps=110, end_lr_ratio=0.1)
    np.testing.assert_allclose([warm(0), warm(5), warm(10), warm(60), warm(110)], [0, 0.5, 1, 0.55, 0.1], atol=1e-6)
    assert float(state_lib.lr_schedule(4e-5)(12345)) == pytest.approx(4e-5)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        state_lib.lr_schedule(1.0, kind="step")


# ---- var-len outcomes, plans, buckets -------------------------------------------------------------------------------


def test_released_outcomes_and_lengths():
    opts = batching.PackingOptions()  # released 480p settings
    sched = batching.resolve_schedule(opts, 0.562, 21)
    outs, probs = batching.outcomes(opts, sched)
    np.testing.assert_allclose(probs, np.asarray([40, 30, 20, 6, 3, 1]) / 100, rtol=1e-6)
    lengths = [batching.step_shape(opts, sched, o, 256, 1).visual_len for o in outs]
    assert lengths == [3899, 7919, 17919, 29439, 38559, 39719]  # SPEC §7.3
    assert [batching.step_shape(opts, sched, o, 256, 1).length for o in outs] == \
        [4224, 8192, 18176, 29696, 38912, 40064]
    image = batching.resolve_schedule(opts, 0.562, 1)
    assert batching.outcomes(opts, image)[0] == (tuple(range(14)),)  # images keep every scale
    with pytest.raises(ValueError, match="beyond"):
        batching.outcomes(dataclasses.replace(opts, var_len_outcomes=((0, 40),)), sched)


def _index(groups):
    entries = []
    for g, (template, pt, n, lens) in enumerate(groups):
        side = 3
        for i in range(n):
            entries.append(batching.IndexEntry(f"k{g}_{i}", template, pt, side, side, int(lens[i % len(lens)])))
    return batching.DataIndex(entries, {})


def test_batch_plan_groups_and_epochs():
    index = _index([(1.0, 5, 10, [3]), (1.0, 1, 7, [3])])
    plan = batching.BatchPlan(index, global_batch=4, seed=3)
    assert plan.batches_per_epoch == 3 + 2
    for e in range(3):
        batches = [plan[e * plan.batches_per_epoch + j] for j in range(plan.batches_per_epoch)]
        ids = [i for b in batches for i in b if i != batching.PLACEHOLDER]
        assert sorted(ids) == list(range(17))  # every entry exactly once per epoch
        for b in batches:
            assert len(b) == 4 and len({index.entries[i].group for i in b if i != batching.PLACEHOLDER}) == 1
        assert sum(b.count(batching.PLACEHOLDER) for b in batches) == 2 + 1
    assert plan.epoch(0) != plan.epoch(1)
    assert batching.BatchPlan(index, 4, seed=3).epoch(1) == plan.epoch(1)


def test_outcome_frequencies_text_buckets_and_possible_shapes(tmp_path):
    opts = dataclasses.replace(OPTS, var_len=True, var_len_outcomes=((0, 1, 2), (0, 1, 2, 5), (0, 1, 2, 3, 4, 5)),
                               var_len_prob=(6, 3, 1))
    index = _index([(1.0, 5, 40, [3, 6, 12]), (1.0, 1, 9, [5])])
    plan = batching.BatchPlan(index, global_batch=2, seed=0)
    from infstar_jax.data import cache as cache_mod
    from infstar_jax.data import metadata as md
    loader = batching.BatchLoader(cache_mod.TokenCache(str(tmp_path)), index, plan, opts, md.DurationRule(), 0, 0, 1)
    seen, counts = set(), np.zeros(3)
    outs, _ = batching.outcomes(opts, batching.resolve_schedule(opts, 1.0, 5))
    for i in range(3000):
        ids = plan[i]
        shape = loader.shape_of(i, ids)
        seen.add(shape)
        real = [index.entries[j] for j in ids if j != batching.PLACEHOLDER]
        assert shape.text_slot == batching.text_bucket(max(e.text_len for e in real), opts.text_buckets)
        if real[0].pt == 5:
            counts[outs.index(shape.kept)] += 1
        else:
            assert shape.kept == (0, 1, 2)
    np.testing.assert_allclose(counts / counts.sum(), [0.6, 0.3, 0.1], atol=0.04)
    possible = set(batching.possible_shapes(index, opts, 2))
    assert seen <= possible and len(possible) == 3 * 2 + 1
    wrong = batching.DataIndex([dataclasses.replace(index.entries[0], h=4, w=4)], {})
    with pytest.raises(ValueError, match="another pixel level"):
        batching.possible_shapes(wrong, opts, 2)
    assert batching.text_bucket(8, (8, 16)) == 8 and batching.text_bucket(9, (8, 16)) == 16
    with pytest.raises(ValueError, match="largest text bucket"):
        batching.text_bucket(17, (8, 16))
