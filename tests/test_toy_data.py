"""The moving-shapes toy dataset: readable mp4s of the requested size and length, both metadata formats, captions
that describe what the video shows, and determinism from the seed."""

import json
import os

import numpy as np
import pytest

from infstar_jax.data import metadata as md
from infstar_jax.data import toy
from infstar_jax.data import video as vid

pytestmark = pytest.mark.training


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("toy"))
    records = toy.generate(out, 12, frames=17, size=(64, 48), seed=11)
    return out, records


def raw_frames(path, n):
    return vid.read_frames(path, np.arange(n))


def test_videos_are_readable_with_the_right_frames_size_and_rate(generated):
    out, records = generated
    assert len(records) == 12
    for r in records:
        path = os.path.join(out, r["path"])
        info = vid.probe(path)
        assert (info.num_frames, info.width, info.height, info.fps) == (17, 64, 48, 16.0)
        assert raw_frames(path, 17).shape == (17, 48, 64, 3)


def test_both_metadata_formats_describe_the_same_videos(generated):
    out, records = generated
    native = md.load_metadata(os.path.join(out, "toy.jsonl"))
    reference = md.load_metadata(os.path.join(out, "reference"), root=out)
    assert not native.skipped and not reference.skipped
    assert [s.path for s in native.samples] == [s.path for s in reference.samples]
    assert [s.captions for s in native.samples] == [s.captions for s in reference.samples]
    for s, r in zip(reference.samples, records):
        assert s.path == os.path.join(out, r["path"]) and s.captions == (r["caption"],)
        assert s.mapped_duration == 1 and s.sample_frames == 17  # 17 frames at 16 fps -> 1 s -> 17 frames
    lines = [json.loads(x) for x in open(os.path.join(out, "reference", "000000", "toy.jsonl"))]
    assert set(lines[0]) >= set(md.REFERENCE_VIDEO_KEYS)
    assert lines[0]["h_div_w"] == 48 / 64 and (lines[0]["width"], lines[0]["height"]) == (64, 48)


def _foreground(frame):
    return frame.astype(np.int32).sum(-1) > 3 * 60


def test_captions_match_shape_color_and_motion(generated):
    out, records = generated
    assert {r["direction"] for r in records} == set(toy.DIRECTIONS)  # 12 videos cover every direction (seed 11)
    for r in records:
        assert r["caption"] == f"a {r['color']} {r['shape']} moving {r['direction']}"
        frames = raw_frames(os.path.join(out, r["path"]), 17)
        first, last = _foreground(frames[0]), _foreground(frames[-1])
        c0 = np.argwhere(first).mean(0)
        c1 = np.argwhere(last).mean(0)
        dy, dx = toy.DIRECTIONS[r["direction"]]
        moved = (c1 - c0) @ np.array([dy, dx])
        assert moved > 8, (r, c0, c1)  # pixels along the captioned direction
        assert abs((c1 - c0) @ np.array([dx, dy])) < 1.5  # and not across it
        color = frames[0][first].mean(0)
        assert np.abs(color - np.array(toy.COLORS[r["color"]])).max() < 40
        ys, xs = np.nonzero(first)
        fill = first.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        expected = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}[r["shape"]]
        assert abs(fill - expected) < 0.12, (r["shape"], fill)


def test_generation_is_deterministic_from_the_seed(tmp_path, generated):
    out, records = generated
    again = toy.generate(str(tmp_path / "a"), 3, frames=17, size=(64, 48), seed=11)
    assert again == records[:3]  # video i does not depend on --num
    for r in again:
        np.testing.assert_array_equal(raw_frames(os.path.join(tmp_path, "a", r["path"]), 17),
                                      raw_frames(os.path.join(out, r["path"]), 17))
    other = toy.generate(str(tmp_path / "b"), 3, frames=17, size=(64, 48), seed=12)
    assert [r["caption"] for r in other] != [r["caption"] for r in records[:3]] or any(
        not np.array_equal(raw_frames(os.path.join(tmp_path, "b", r["path"]), 1),
                           raw_frames(os.path.join(out, q["path"]), 1)) for r, q in zip(other, records))


def test_render_matches_the_motion_exactly():
    m = toy.ShapeMotion("square", "red", "right", radius=5.0, start=(16.0, 10.0), end=(16.0, 30.0))
    frames = toy.render(m, 3, 32, 48)
    for t, cx in enumerate([10.0, 20.0, 30.0]):
        # Pixel centers strictly inside the 9x9 square are fully red, pixels beyond it are background.
        assert (frames[t, 16, int(cx) - 4: int(cx) + 4] == toy.COLORS["red"]).all()
        assert (frames[t, 16, int(cx) + 6:] == 0).all() and (frames[t, 16, : int(cx) - 5] == 0).all()


def test_cli(tmp_path, capsys):
    assert toy.main(["--out", str(tmp_path), "--num", "2", "--frames", "9", "--size", "32x18", "--seed", "3"]) == 0
    info = vid.probe(str(tmp_path / "videos" / "00001.mp4"))
    assert (info.num_frames, info.width, info.height) == (9, 32, 18)
    assert "wrote 2 videos" in capsys.readouterr().out
    for bad in ("33x16", "32", "axb"):
        with pytest.raises(SystemExit):
            toy.main(["--out", str(tmp_path), "--size", bad])


def test_flat_colors_survive_encoding(tmp_path):
    names = list(toy.COLORS)
    frames = np.stack([np.broadcast_to(np.array(toy.COLORS[c], np.uint8), (16, 24, 3)) for c in names])
    toy.write_mp4(str(tmp_path / "c.mp4"), frames, 16)
    back = raw_frames(str(tmp_path / "c.mp4"), len(names)).astype(int)
    assert np.abs(back - frames).max() <= 3
