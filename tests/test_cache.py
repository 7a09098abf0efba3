"""Token cache: round trip, resumable and sharded fills, atomic entries, and the grain reader with the training
duration rule (latents cut to the needed latent frames)."""

import dataclasses
import json
import os

import numpy as np
import pytest

from infstar_jax.data import cache as cache_mod
from infstar_jax.data import metadata as md
from infstar_jax.data import pipeline as pl
from infstar_jax.data import toy
from infstar_jax.data import video as vid

pytestmark = pytest.mark.training

PN = 2  # 32x32 frames for the square toy videos
CACHE_RULE = md.DurationRule(duration_resolution=0.25)


class FakeVAE:
    """Deterministic stand-in for the VAE: [T, H, W, 3] -> [1 + (T-1)//4, H/16, W/16, 8], counting calls."""

    def __init__(self):
        self.calls = 0
        self.proj = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)

    def __call__(self, frames):
        self.calls += 1
        t, h, w, _ = frames.shape
        keep = frames[::4] if t > 1 else frames  # frames 0, 4, 8, ... like a 4x causal stride
        pooled = keep.reshape(keep.shape[0], h // 16, 16, w // 16, 16, 3).mean(axis=(2, 4))
        return pooled @ self.proj


class FakeT5:
    def __init__(self):
        self.calls = 0

    def __call__(self, caption):
        self.calls += 1
        codes = np.frombuffer(caption.encode(), np.uint8).astype(np.float32)
        return np.stack([codes / 255, np.cos(codes)], axis=1)  # [len, 2]


@pytest.fixture(scope="module")
def toy_meta(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("toy"))
    toy.generate(out, 4, frames=33, size=(32, 32), seed=2)  # 2 s clips
    return md.load_metadata(os.path.join(out, "reference"), root=out, rule=CACHE_RULE)


def test_round_trip_and_resume(tmp_path, toy_meta):
    root = str(tmp_path / "cache")
    samples = toy_meta.samples + [toy_meta.samples[0]]  # a repeated line is encoded once
    samples.append(dataclasses.replace(toy_meta.samples[1], path=str(tmp_path / "gone.mp4"),
                                          source_path="gone.mp4"))
    vae, t5 = FakeVAE(), FakeT5()
    report = cache_mod.fill_cache(samples, vae, t5, root, pn=PN, process_index=0, process_count=1)
    assert (report.written, report.existing, report.duplicates, dict(report.failed)) == (4, 0, 1, {"missing": 1})
    assert vae.calls == 4 and t5.calls == 4

    cache = cache_mod.TokenCache(root)
    assert cache.keys() == sorted(s.key for s in toy_meta.samples)
    assert cache.info() == {"format": cache_mod.FORMAT, "pn": PN, "video_fps": 16}
    for s in toy_meta.samples:
        entry = cache.read(s.key)
        clip = vid.load_clip(s.path, s.sample_frames, PN, begin_frame_id=s.begin_frame_id)
        np.testing.assert_array_equal(entry["latent"], FakeVAE()(clip.frames))
        assert entry["latent"].dtype == np.float32 and entry["latent"].shape == (9, 2, 2, 8)
        caption = "<<<t=2s>>>" + s.captions[0]
        assert entry["meta"]["caption"] == caption
        np.testing.assert_array_equal(entry["text"], FakeT5()(caption))
        assert entry["meta"]["frame_indices"] == clip.indices.tolist()
        assert entry["meta"]["real_duration"] == 33 / 16
        assert cache_mod.sample_from_meta(entry["meta"]) == s

    # A second fill finds everything and encodes nothing.
    again = cache_mod.fill_cache(samples, vae, t5, root, pn=PN, process_index=0, process_count=1)
    assert (again.written, again.existing, vae.calls, t5.calls) == (0, 4, 4, 4)

    # A fill killed after an entry's arrays but before its index file: only that entry is redone.
    victim = toy_meta.samples[2].key
    os.remove(os.path.join(root, "index", f"{victim}.json"))
    assert victim not in cache.keys()
    third = cache_mod.fill_cache(samples, vae, t5, root, pn=PN, process_index=0, process_count=1)
    assert (third.written, third.existing, vae.calls) == (1, 3, 5)
    assert victim in cache.keys()

    with pytest.raises(cache_mod.CacheError, match="pn=2"):
        cache_mod.fill_cache(samples, vae, t5, root, pn=3, process_index=0, process_count=1)


def test_sharded_fill_splits_the_work(tmp_path, toy_meta):
    root = str(tmp_path / "cache")
    vaes = [FakeVAE(), FakeVAE()]
    reports = [cache_mod.fill_cache(toy_meta, vaes[i], None, root, pn=PN, process_index=i, process_count=2)
               for i in range(2)]
    assert [r.written for r in reports] == [2, 2] and [v.calls for v in vaes] == [2, 2]
    cache = cache_mod.TokenCache(root)
    assert cache.keys() == sorted(s.key for s in toy_meta.samples)
    assert cache.read(cache.keys()[0])["text"] is None


def test_cache_pipeline_cuts_latents_to_the_training_duration(tmp_path, toy_meta):
    root = str(tmp_path / "cache")
    cache_mod.fill_cache(toy_meta, FakeVAE(), FakeT5(), root, pn=PN, process_index=0, process_count=1)
    source = cache_mod.CacheSource(root)
    assert len(source) == 4
    # Training at 1 s at most (17 frames): the 2 s latents (9 frames) are cut to 5 latent frames.
    opts = pl.DataOptions(pn=PN, rule=md.DurationRule(video_frames=17), seed=0, num_epochs=1, num_threads=1)
    got = list(pl.cache_pipeline(source, opts, process_index=0, process_count=1))
    assert len(got) == 4
    cache = cache_mod.TokenCache(root)
    for b in got:
        entry = cache.read(str(b["key"][0]))
        np.testing.assert_array_equal(b["latent"][0], entry["latent"][:5])
        assert b["duration"][0] == 1.0
        assert str(b["caption"][0]) == entry["meta"]["caption"]
        np.testing.assert_array_equal(b["text"][0], entry["text"])
        assert b["text_len"][0] == entry["text"].shape[0]

    # Online text: the caption rule with the training duration, no cached features.
    got = list(pl.cache_pipeline(source, opts, use_cached_text=False, process_index=0, process_count=1))
    captions = {str(b["caption"][0]) for b in got}
    assert captions == {"<<<t=1s>>>" + s.captions[0] for s in toy_meta.samples} and "text" not in got[0]

    # A corrupt entry is skipped and counted; the rest still arrive; the state resumes the order.
    key = cache.keys()[1]
    chunk_dir = os.path.join(root, "arrays", key, "latent", "c")
    for dirpath, _, files in os.walk(chunk_dir):
        for f in files:
            with open(os.path.join(dirpath, f), "wb") as fh:
                fh.write(b"garbage")
    opts2 = pl.DataOptions(pn=PN, rule=md.DurationRule(video_frames=17), seed=1, num_epochs=2, num_threads=1)
    p = pl.cache_pipeline(source, opts2, process_index=0, process_count=1)
    it = iter(p)
    first = [str(next(it)["key"][0]) for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))
    rest = [str(b["key"][0]) for b in it]
    assert len(first + rest) == 6 and key not in first + rest
    assert p.skipped.counts() == {"cache_unreadable": 2}
    p2 = pl.cache_pipeline(source, opts2, process_index=0, process_count=1)
    it2 = iter(p2)
    it2.set_state(state)
    assert [str(b["key"][0]) for b in it2] == rest
    assert p2.skipped.counts() == {"cache_unreadable": 2}


def test_errors(tmp_path, toy_meta):
    root = str(tmp_path / "cache")
    with pytest.raises(cache_mod.CacheError, match=r"\[t, h, w, C\]"):
        cache_mod.fill_cache(toy_meta, lambda f: np.zeros((3, 4)), None, root, pn=PN, process_index=0,
                             process_count=1)
    cache = cache_mod.TokenCache(root)
    with pytest.raises(cache_mod.CacheError, match="no entry"):
        cache.read("0" * 32)
    with pytest.raises(ValueError, match="empty"):
        pl.cache_pipeline(cache_mod.CacheSource(str(tmp_path / "empty")), process_index=0, process_count=1)
