"""`python -m infstar_jax.sample` end to end with small converted parts: mp4 output read back by PyAV; user errors."""

from pathlib import Path

import numpy as np
import pytest

from goldens import case_dirs
from infstar_jax import checkpoint
from infstar_jax.sample import main as sample_main

pytestmark = [pytest.mark.sampling, pytest.mark.torch]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """transformer/ and vae/ converted from a C_sampling golden case, text_encoder/ a random tiny T5 of the
    transformer's text width with a sentencepiece tokenizer trained on the fly."""
    from test_t5 import TINY, build_torch_encoder
    from test_text_tokenizer import train_spiece

    from infstar_jax.convert.__main__ import main as convert_main

    cases = case_dirs("C_sampling")
    assert cases, "no C_sampling golden case found"
    case = cases[0]
    root = tmp_path_factory.mktemp("ckpt")
    assert convert_main(["transformer", "--src", str(case / "gpt.pth"), "--out", str(root / "transformer")]) == 0
    assert convert_main(["vae", "--src", str(case / "vae.pth"), "--out", str(root / "vae")]) == 0
    text_dim = checkpoint.read_meta(root / "transformer")["config"]["text_dim"]
    hf = dict(TINY, d_model=text_dim)
    model = build_torch_encoder(hf, seed=3)
    model.save_pretrained(root / "hf_t5")
    train_spiece(root / "hf_t5")
    assert convert_main(["t5", "--src", str(root / "hf_t5"), "--out", str(root / "text_encoder")]) == 0
    return root


def run(ckpt, out, *extra):
    return sample_main(["--ckpt", str(ckpt), "--out", str(out), "--num-scales", "3", "--precision", "fp32",
                        "--no-progress", *extra])


def test_writes_mp4s_that_pyav_reads_back(ckpt, tmp_path):
    import av

    out = tmp_path / "out"
    assert run(ckpt, out, "--prompt", "a red circle moving left", "--prompt", "a blue square", "--duration", "1",
               "--batch", "2", "--seed", "7") == 0
    videos = sorted(out.glob("*.mp4"))
    assert [v.name for v in videos] == ["0000_seed7.mp4", "0001_seed8.mp4"]
    for v in videos:
        with av.open(str(v)) as container:
            stream = container.streams.video[0]
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            assert stream.average_rate == 16
        assert len(frames) == 17  # 1 s at 16 fps + 1
        assert frames[0].shape == (32, 64, 3)  # 16:9 template, 3 scales: last scale 2x4 latents
    assert (out / "contact_sheet.png").exists()
    assert "a blue square" in (out / "prompts.txt").read_text()


@pytest.mark.slow  # not a must-show; keeps the default suite under 15 min on 2 cores
def test_image_mode_writes_png(ckpt, tmp_path):
    from PIL import Image

    out = tmp_path / "img"
    assert run(ckpt, out, "--prompt", "a cat", "--duration", "0", "--aspect", "1:1") == 0
    img = np.asarray(Image.open(out / "0000_seed41.png"))
    assert img.shape == (48, 48, 3) and img.dtype == np.uint8


def test_user_errors(ckpt, tmp_path, capsys):
    assert run(tmp_path / "nowhere", tmp_path / "o", "--prompt", "x") == 2
    assert "does not exist" in capsys.readouterr().err
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "transformer").symlink_to(ckpt / "transformer")
    assert run(partial, tmp_path / "o", "--prompt", "x") == 2
    assert "vae/" in capsys.readouterr().err
    assert run(ckpt, tmp_path / "o", "--prompt", "x", "--resolution", "4k") == 2
    assert "480p" in capsys.readouterr().err
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    assert run(ckpt, tmp_path / "o", "--prompt", "x", "--duration", "1", "--image", str(bad)) == 2
    assert "not a readable image" in capsys.readouterr().err
