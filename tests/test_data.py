"""Training data: reference/native metadata, the reference's frame-index and resize rules, the grain pipeline's
counted skips, resumable iterator state, per-process sharding and global batches."""

import dataclasses
import fractions
import json
import math
import os

import jax
import numpy as np
import pytest
from PIL import Image

from infstar_jax import parallel, schedules
from infstar_jax.data import metadata as md
from infstar_jax.data import pipeline as pl
from infstar_jax.data import toy
from infstar_jax.data import video as vid

pytestmark = pytest.mark.training

# The first 3 lines of the reference's data/infinitystar_toy_data/split_jsonls/000001/0001_0010_000000100.jsonl,
# verbatim (the original file holds 100 identical lines, 124 KB; its 10 sibling files are identical copies).
REFERENCE_TOY = os.path.join(os.path.dirname(__file__), "data", "reference_toy", "split_jsonls")


def write_coded_video(path, num_frames, fps, height, width, faststart=False):
    """Lossless RGB H.264 whose frame i is a flat gray of value i (so decoded frames name their own index)."""
    import av

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w", options={"movflags": "faststart"} if faststart else {}) as c:
        s = c.add_stream("libx264rgb", rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "rgb24"
        s.options = {"crf": "0", "preset": "ultrafast", "threads": "1"}
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), i % 256, np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, fractions.Fraction(1, fps)
            c.mux(s.encode(frame))
        c.mux(s.encode())


def frame_codes(frames):
    """Inverse of ``write_coded_video`` after the [-1, 1] transform: ``[T]`` frame indices."""
    values = np.round((frames + 1) / 2 * 255)
    assert (values == values[:, :1, :1, :1]).all(), "a coded frame is not flat after resize/crop"
    return values[:, 0, 0, 0].astype(np.int64)


def reference_indices(fps, n, start, end, sample_frames):
    """The reference rule written out directly (``video_decoder.py:get_clip``)."""
    start_idx = math.ceil(fps * start)
    end_idx = min(math.ceil(fps * end), n)
    return np.linspace(start_idx, end_idx - 1, sample_frames, dtype=int)


def collect(it, n):
    return [next(it) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# metadata
# ---------------------------------------------------------------------------------------------------------------


def test_reference_toy_jsonl_is_read_and_its_videos_decode(tmp_path):
    raw = [json.loads(line) for line in open(os.path.join(REFERENCE_TOY, "000001", "0001_0010_000000100.jsonl"))]
    meta = md.load_metadata(REFERENCE_TOY, root=str(tmp_path))  # folder/*/*.jsonl, as the reference globs
    assert len(meta.samples) == len(raw) and not meta.skipped
    rule = md.DurationRule()
    for s, r in zip(meta.samples, raw):
        assert s.kind == "video" and s.source_path == r["video_path"]
        assert s.path == os.path.join(str(tmp_path), r["video_path"])
        assert (s.begin_frame_id, s.end_frame_id, s.fps) == (r["begin_frame_id"], r["end_frame_id"], r["fps"])
        real = (r["end_frame_id"] - r["begin_frame_id"]) / r["fps"]
        mapped = min(int(real), (81 - 1) // 16)
        assert s.mapped_duration == mapped and s.sample_frames == int(mapped * 16 + 1)
        assert s.captions == (r["tarsier2_caption"],)

    # A video matching the jsonl: its path, fps and frame range, at a small size of the same h/w.
    r = raw[0]
    n = r["end_frame_id"]
    h, w = r["height"] // 10, r["width"] // 10
    write_coded_video(os.path.join(str(tmp_path), r["video_path"]), n, r["fps"], h, w)
    pn = 4
    p = pl.video_pipeline(meta, pl.DataOptions(pn=pn, seed=3, num_epochs=1, shuffle=False, num_threads=0),
                          process_index=0, process_count=1)
    batches = list(p)
    assert len(batches) == len(raw) and p.skipped.total == 0
    s = meta.samples[0]
    start = r["begin_frame_id"] / r["fps"]
    want = reference_indices(r["fps"], n, start, start + (s.sample_frames - 1) / 16, s.sample_frames)
    tgt = schedules.pixel_hw(schedules.nearest_template(h / w), pn)
    for b in batches:
        assert b["video"].shape == (1, s.sample_frames, *tgt, 3)
        np.testing.assert_array_equal(frame_codes(b["video"][0]), want)
        prefix = f"<<<t={s.mapped_duration}s>>>"
        caption = str(b["caption"][0])
        assert caption.startswith(prefix)
        body = caption[len(prefix):]
        sentences = [x for x in r["tarsier2_caption"].split(".") if x]
        assert body == r["tarsier2_caption"] or body in {".".join(sentences[:k]) + "." for k in
                                                          range(1, len(sentences) + 1)}


def test_reference_fields_minicpm_quality_prompt_images_and_bad_lines(tmp_path):
    lines = [
        {"video_path": "a.mp4", "begin_frame_id": 0, "end_frame_id": 98, "fps": 24, "tarsier2_caption": "T one.",
         "MiniCPM_V_2_6_caption": "M one.", "quality_prompt": "HQ", "h_div_w": 0.5},
        {"video_path": "b.mp4", "begin_frame_id": 10, "end_frame_id": 40, "fps": 30, "tarsier2_caption": "B."},
        {"image_path": "c.png", "text": "short", "long_caption": "long one. two."},
        {"image_path": "d.png", "text": "", "long_caption": "only long."},
        {"video_path": "e.mp4", "begin_frame_id": 0, "end_frame_id": 10, "fps": 24},  # no caption
        {"foo": 1},
    ]
    f = tmp_path / "part" / "x.jsonl"
    f.parent.mkdir()
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    meta = md.load_metadata(str(tmp_path), root="/data")
    assert dict(meta.skipped) == {"bad_entry": 2, "bad_json": 1}
    a, b, c, d = meta.samples
    assert a.captions == ("T one.", "M one.") and a.caption_weights == (0.5, 0.5) and a.quality_prompt == "HQ"
    assert a.mapped_duration == int(98 / 24) and a.sample_frames == int(98 / 24) * 16 + 1 and a.path == "/data/a.mp4"
    assert b.mapped_duration == 1 and b.sample_frames == 17 and b.begin_frame_id == 10
    assert c.kind == "image" and c.captions == ("short", "long one. two.") and c.caption_weights == (0.3, 0.7)
    assert d.captions == ("only long.",)

    # MiniCPM 50/50, the quality prompt after a space, then the duration prefix.
    rng = np.random.default_rng(0)
    got = [md.training_caption(a, rng, short_prob=0.0) for _ in range(2000)]
    frac = got.count("<<<t=4s>>>T one. HQ") / len(got)
    assert set(got) == {"<<<t=4s>>>T one. HQ", "<<<t=4s>>>M one. HQ"} and 0.45 < frac < 0.55
    # Images: short text with short_cap_prob, no duration prefix.
    got = [md.training_caption(c, rng, short_prob=0.0) for _ in range(2000)]
    assert set(got) == {"short", "long one. two."} and 0.25 < got.count("short") / len(got) < 0.35


def test_caption_truncation_rate_and_fractional_duration_prefix():
    caption = "One. Two. Three. Four."
    s = md.Sample(kind="video", path="v", source_path="v", captions=(caption,), caption_weights=(1.0,), origin="t",
                  mapped_duration=5, sample_frames=81)
    rng = np.random.default_rng(1)
    got = [md.training_caption(s, rng, short_prob=0.3) for _ in range(4000)]
    assert all(g.startswith("<<<t=5s>>>") for g in got)
    bodies = [g[len("<<<t=5s>>>"):] for g in got]
    allowed = {"One.", "One. Two.", "One. Two. Three.", "One. Two. Three. Four."}
    assert set(bodies) == allowed
    truncated = sum(b != caption for b in bodies) / len(bodies)
    # P(truncate) = 0.3, and a truncation keeps all 4 sentences with probability 1/4.
    assert abs(truncated - 0.3 * 3 / 4) < 0.03
    assert md.training_caption(s, rng, dynamic_length=False, append_duration=False) == caption
    quarter = md.Sample(kind="video", path="v", source_path="v", captions=("x",), caption_weights=(1.0,), origin="t",
                        mapped_duration=4.75, sample_frames=77)
    assert md.training_caption(quarter, rng, short_prob=0) == "<<<t=4.75s>>>x"


@pytest.mark.parametrize("real,kwargs,want", [
    (4.99, {}, (4, None)),
    (7.0, {}, (5, None)),
    (7.0, {"drop_long_video": True}, (None, "too_long")),
    (1.5, {"min_video_frames": 33}, (None, "too_short")),
    (2.0, {"min_video_frames": 33}, (2, None)),
    (4.9, {"duration_resolution": 0.25}, (4.75, None)),
    (11.0, {"video_frames": 161}, (10, None)),
])
def test_duration_rule(real, kwargs, want):
    rule = md.DurationRule(**kwargs)
    res = rule.duration_resolution
    mapped = int(real / res) * res
    assert rule.classify(real) == want
    if want[0] is not None:
        assert type(want[0]) is type(rule.classify(real)[0])
        assert rule.sample_frames(want[0]) == int(want[0] * 16 + 1)
        assert mapped == want[0] or mapped > rule.max_duration


def test_native_format_paths_ranges_and_errors(tmp_path):
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in [
        {"path": "v/a.mp4", "caption": "a", "start_s": 1.0, "end_s": 3.5},
        {"path": "/abs/b.mp4", "caption": "b"},
        {"path": "i.png", "caption": "c"},
        {"path": "x.mp4", "caption": "d", "start_s": 2.0, "end_s": 1.0},
    ]))
    meta = md.load_metadata(str(tmp_path / "m.jsonl"))
    a, b, c = meta.samples
    assert a.path == str(tmp_path / "v" / "a.mp4") and a.mapped_duration == 2 and a.sample_frames == 33
    assert b.path == "/abs/b.mp4" and b.sample_frames is None
    assert c.kind == "image" and c.sample_frames == 1
    assert dict(meta.skipped) == {"bad_entry": 1}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        md.load_metadata(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="unknown metadata format"):
        md.load_metadata(str(tmp_path / "m.jsonl"), format="csv")


# ---------------------------------------------------------------------------------------------------------------
# video decoding
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fps,n,start,sample_frames", [
    (24.0, 120, 0.0, 81), (16.0, 17, 0.0, 17), (30000 / 1001, 400, 10 / (30000 / 1001), 33), (25.0, 60, 0.5, 33),
])
def test_frame_indices_follow_the_reference_rule(fps, n, start, sample_frames):
    info = vid.VideoInfo("v", fps, n, 8, 8)
    s, e = vid.clip_window(info, start, sample_frames, 16)
    assert s == start and e == min(start + (sample_frames - 1) / 16, n / fps)
    np.testing.assert_array_equal(vid.frame_indices(fps, n, s, e, sample_frames),
                                  reference_indices(fps, n, s, e, sample_frames))


def test_clip_window_overrun_margin():
    info = vid.VideoInfo("v.mp4", 16.0, 78, 8, 8)  # 4.875 s: an 81-frame clip overruns by 0.125 s (allowed)
    assert vid.clip_window(info, 0.0, 81, 16) == (0.0, 78 / 16)
    with pytest.raises(vid.ClipOutOfRangeError, match="v.mp4"):
        vid.clip_window(vid.VideoInfo("v.mp4", 16.0, 76, 8, 8), 0.0, 81, 16)  # 0.25 s over


def test_decoded_frames_are_the_reference_indices(tmp_path):
    path = str(tmp_path / "coded.mp4")
    fps, n = 24, 100
    write_coded_video(path, n, fps, 36, 64)
    info = vid.probe(path)
    assert (info.fps, info.num_frames, info.height, info.width) == (fps, n, 36, 64)
    clip = vid.load_clip(path, 33, 3, begin_frame_id=10)
    start = 10 / fps
    want = reference_indices(fps, n, start, start + 2.0, 33)
    np.testing.assert_array_equal(clip.indices, want)
    np.testing.assert_array_equal(frame_codes(clip.frames), want)
    # A clip overrunning by at most 0.2 s is cut at the video's end: 81 frames of a 78-frame 16 fps video.
    short = str(tmp_path / "short.mp4")
    write_coded_video(short, 78, 16, 36, 64)
    clip = vid.load_clip(short, 81, 3)
    np.testing.assert_array_equal(frame_codes(clip.frames), reference_indices(16, 78, 0.0, 78 / 16, 81))
    with pytest.raises(vid.ClipOutOfRangeError, match="short.mp4"):
        vid.load_clip(short, 81, 3, start_s=0.25)


@pytest.mark.parametrize("hw,tgt", [((72, 128), (48, 80)), ((128, 72), (80, 48)), ((50, 50), (32, 64)),
                                    ((45, 61), (64, 64)), ((64, 64), (64, 64))])
def test_resize_crop_matches_direct_pil(hw, tgt):
    rng = np.random.default_rng(sum(hw))
    img = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    h, w = hw
    th, tw = tgt
    # The reference transform: cover the target box, the other side truncated by int(), center crop.
    if w / h <= tw / th:
        size = (tw, int(tw / (w / h)))
    else:
        size = (int((w / h) * th), th)
    big = np.asarray(Image.fromarray(img).resize(size, resample=Image.LANCZOS))
    y, x = (big.shape[0] - th) // 2, (big.shape[1] - tw) // 2
    want = big[y:y + th, x:x + tw]
    got = vid.resize_crop(img, th, tw)
    assert got.shape == (th, tw, 3)
    np.testing.assert_array_equal(got, want)
    unit = vid.to_signed_unit(got)
    assert unit.dtype == np.float32
    np.testing.assert_array_equal(unit, (want.astype(np.float32) / np.float32(255)) * 2 - 1)


@pytest.mark.parametrize("pn", [4, "0.40M"])
def test_transformed_clip_has_the_template_pixel_size(tmp_path, pn):
    path = str(tmp_path / "v.mp4")
    write_coded_video(path, 5, 16, 40, 72)  # h/w 0.556 -> template 0.562
    clip = vid.load_clip(path, 5 if pn == 4 else 1, pn)
    assert clip.template == schedules.nearest_template(40 / 72) == 0.562
    assert clip.frames.shape[1:3] == schedules.pixel_hw(0.562, pn)
    assert clip.frames.min() >= -1 and clip.frames.max() <= 1


def test_typed_errors(tmp_path):
    with pytest.raises(vid.VideoNotFoundError, match="no such file"):
        vid.probe(str(tmp_path / "missing.mp4"))
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(vid.VideoUnreadableError, match="bad.mp4"):
        vid.load_clip(str(bad), 17, 4)
    path = str(tmp_path / "fs.mp4")
    write_coded_video(path, 60, 16, 32, 32, faststart=True)
    data = open(path, "rb").read()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 3])  # header intact (faststart), frames missing
    with pytest.raises(vid.VideoTruncatedError, match="frame"):
        vid.load_clip(str(cut), 49, 2)
    with pytest.raises(vid.VideoUnreadableError, match="image"):
        vid.load_image(str(bad), 2)


# ---------------------------------------------------------------------------------------------------------------
# pipeline
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("toy"))
    toy.generate(out, 6, frames=17, size=(32, 32), seed=5)
    return out


def multi_sentence_samples(toy_dir):
    """The toy videos with 3-sentence captions, so the caption rule's randomness shows."""
    meta = md.load_metadata(os.path.join(toy_dir, "toy.jsonl"))
    return [dataclasses.replace(s, captions=(f"{s.captions[0]}. Then more. The end.",)) for s in meta.samples]


def opts(**kw):
    base = dict(pn=2, seed=7, num_threads=2, prefetch=2, short_prob=0.5)
    base.update(kw)
    return pl.DataOptions(**base)


def test_corrupt_missing_and_truncated_videos_are_skipped_and_counted(tmp_path, toy_dir):
    good = md.load_metadata(os.path.join(toy_dir, "toy.jsonl")).samples[:3]
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    path = str(tmp_path / "fs.mp4")
    write_coded_video(path, 60, 16, 32, 32, faststart=True)
    cut = tmp_path / "cut.mp4"
    data = open(path, "rb").read()
    cut.write_bytes(data[: len(data) // 3])  # header intact (faststart), frames missing
    lines = [json.dumps({"path": s.path, "caption": s.captions[0]}) for s in good] + [
        json.dumps({"path": str(bad), "caption": "corrupt"}),
        json.dumps({"path": str(tmp_path / "missing.mp4"), "caption": "missing"}),
        json.dumps({"path": str(cut), "caption": "truncated", "end_s": 3.0}),
        "{broken json",
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    meta = md.load_metadata(str(tmp_path / "m.jsonl"))
    p = pl.video_pipeline(meta, opts(num_epochs=1), process_index=0, process_count=1)
    it = iter(p)
    got = list(it)
    assert sorted(str(b["path"][0]) for b in got) == sorted(s.path for s in good)
    want = {"bad_json": 1, "missing": 1, "truncated": 1, "unreadable": 1}
    assert p.skipped.counts() == want
    assert p.skipped.metrics() == {"data/skipped": 4, **{f"data/skipped/{k}": v for k, v in want.items()}}
    state = json.loads(json.dumps(it.get_state()))
    assert state["skipped"] == want

    # Two epochs: each bad file is counted once per epoch it is met in.
    p2 = pl.video_pipeline(meta, opts(num_epochs=2), process_index=0, process_count=1)
    assert len(list(p2)) == 6
    assert p2.skipped.counts() == {"bad_json": 1, "missing": 2, "truncated": 2, "unreadable": 2}


def test_all_failing_shard_raises_instead_of_spinning(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "gone.mp4", "caption": "x"}) + "\n")
    p = pl.video_pipeline(md.load_metadata(str(tmp_path / "m.jsonl")), opts(), process_index=0, process_count=1)
    with pytest.raises(pl.DataError, match="in a row"):
        next(iter(p))


def test_iterator_state_resumes_the_same_order(toy_dir):
    samples = multi_sentence_samples(toy_dir)

    def run(state=None, n=7):
        it = iter(pl.video_pipeline(samples, opts(), process_index=0, process_count=1))
        if state is not None:
            it.set_state(json.loads(json.dumps(state)))
        return it, collect(it, n)

    _, full = run(n=14)
    it, first = run(n=7)
    state = it.get_state()
    _, resumed = run(state, n=7)
    for a, b in zip(full, first + resumed):
        assert a["key"][0] == b["key"][0] and a["caption"][0] == b["caption"][0]
        np.testing.assert_array_equal(a["video"], b["video"])
    keys = [str(b["key"][0]) for b in full]
    assert sorted(keys[:6]) == sorted(s.key for s in samples)  # epoch 1 is a permutation
    assert keys[:6] != keys[6:12]  # epoch 2 is shuffled differently
    assert len({str(b["caption"][0]) for b in full}) > len(samples)  # captions vary over epochs
    it_other = iter(pl.video_pipeline(samples, opts(seed=8), process_index=0, process_count=1))
    assert [str(b["key"][0]) for b in collect(it_other, 6)] != keys[:6]


def test_per_process_shards_partition_the_data(toy_dir):
    import grain

    for n, count in [(10, 3), (6, 2), (7, 7)]:
        parts = [list(pl.shard(grain.MapDataset.range(n), i, count, drop_remainder=False)) for i in range(count)]
        assert sorted(sum(parts, [])) == list(range(n))
        even = [list(pl.shard(grain.MapDataset.range(n), i, count)) for i in range(count)]
        assert sorted(sum(even, [])) == list(range(n - n % count))
        assert len({len(p) for p in even}) == 1
    with pytest.raises(ValueError, match="cannot be sharded"):
        pl.shard(grain.MapDataset.range(2), 0, 3)

    samples = md.load_metadata(os.path.join(toy_dir, "toy.jsonl")).samples
    seen = []
    for i in range(3):
        p = pl.video_pipeline(samples, opts(num_epochs=1), process_index=i, process_count=3)
        seen.append({str(b["key"][0]) for b in p})
    assert all(len(s) == 2 for s in seen)
    assert set.union(*seen) == {s.key for s in samples} and sum(map(len, seen)) == len(samples)
    # 6 samples over 4 processes: finite epochs cut to equal shards and count the cut; an endless stream keeps all.
    finite, endless = [], []
    for i in range(4):
        p = pl.video_pipeline(samples, opts(num_epochs=1), process_index=i, process_count=4)
        finite.append([str(b["key"][0]) for b in p])
        assert p.skipped.counts() == {"shard_remainder": 2}
        p = pl.video_pipeline(samples, opts(), process_index=i, process_count=4)
        assert p.num_samples == (2 if i < 2 else 1) and p.skipped.total == 0
        endless.append({str(b["key"][0]) for b in collect(iter(p), 4)})
    assert [len(k) for k in finite] == [1, 1, 1, 1] and len(set(sum(finite, []))) == 4
    assert set.union(*endless) == {s.key for s in samples} and sum(map(len, endless)) == len(samples)
    with pytest.raises(ValueError, match="process_index"):
        pl.video_pipeline(samples, opts(), process_index=3, process_count=3)


def test_batches_images_and_native_durations(tmp_path, toy_dir):
    img = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "i.png")
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in [
        {"path": "i.png", "caption": "an image"},
        {"path": os.path.join(toy_dir, "videos", "00001.mp4"), "caption": "v"},
    ]))
    meta = md.load_metadata(str(tmp_path / "m.jsonl"))
    got = list(pl.video_pipeline(meta, opts(num_epochs=1, shuffle=False), process_index=0, process_count=1))
    image, video = got
    tgt = schedules.pixel_hw(schedules.nearest_template(40 / 30), 2)
    assert image["video"].shape == (1, 1, *tgt, 3) and str(image["caption"][0]) == "an image"
    np.testing.assert_array_equal(image["video"][0, 0], vid.to_signed_unit(vid.resize_crop(img, *tgt)))
    # The native entry without end_s runs to the file's end: 17 frames at 16 fps -> 1 s -> 17 frames.
    assert video["video"].shape == (1, 17, 32, 32, 3) and str(video["caption"][0]) == "<<<t=1s>>>v"

    samples = md.load_metadata(os.path.join(toy_dir, "toy.jsonl")).samples
    p = pl.video_pipeline(samples, opts(batch_size=4, num_epochs=1), process_index=0, process_count=1)
    (batch,) = list(p)  # 6 samples, batch 4, remainder dropped
    assert batch["video"].shape == (4, 17, 32, 32, 3) and batch["caption"].shape == (4,)
    with pytest.raises(ValueError, match="cannot batch 'video'"):
        pl.stack_batch([{"video": np.zeros((1, 2))}, {"video": np.zeros((1, 3))}])
    padded = pl.stack_batch([{"text": np.ones((2, 3))}, {"text": np.ones((4, 3))}])
    assert padded["text"].shape == (2, 4, 3) and list(padded["text_len"]) == [2, 4]
    assert padded["text"][0, 2:].sum() == 0


def test_global_batch_on_eight_devices():
    mesh = parallel.make_mesh()  # all 8 simulated devices on fsdp
    local = {"latent": np.arange(8 * 3 * 2, dtype=np.float32).reshape(8, 3, 2), "caption": np.asarray(["x"] * 8)}
    out = pl.global_batch(local, mesh)
    arr = out["latent"]
    assert isinstance(arr, jax.Array) and arr.shape == (8, 3, 2)
    assert len(arr.addressable_shards) == 8 and {s.data.shape for s in arr.addressable_shards} == {(1, 3, 2)}
    np.testing.assert_array_equal(np.asarray(arr), local["latent"])
    assert out["caption"] is local["caption"] or (out["caption"] == local["caption"]).all()
    with pytest.raises(ValueError, match="cannot be split"):
        pl.global_batch({"latent": np.zeros((6, 2), np.float32)}, mesh)
