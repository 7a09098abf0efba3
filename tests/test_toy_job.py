"""The toy main job (``python -m infstar_jax.toy``) end to end with very short runs: every stage's output exists
and is readable, and a re-run skips the finished stages."""

import os
import subprocess
import sys

import av
import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.training, pytest.mark.slow]


def _run(workdir):
    # One CPU device, as on a user's machine (the test session simulates 8, which the toy batch of 2 cannot split).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", "infstar_jax.toy", "--workdir", str(workdir), "--videos", "6",
                           "--tokenizer-steps", "2", "--transformer-steps", "2", "--prompt", "a red circle moving right"],
                          capture_output=True, text=True, timeout=1800, env=env)


def test_toy_main_job_writes_videos_and_a_contact_sheet(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bit accuracy per scale" in proc.stdout
    video = tmp_path / "samples" / "00_a_red_circle_moving_right.mp4"
    with av.open(str(video)) as f:
        frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
    assert len(frames) == 17 and frames[0].shape == (32, 32, 3)
    sheet = np.asarray(Image.open(tmp_path / "samples" / "contact_sheet.png"))
    assert sheet.ndim == 3 and sheet.shape[2] == 3
    for stage in ("tokenizer/export/vae", "transformer/export/transformer", "cache"):
        assert (tmp_path / stage).exists(), stage
    again = _run(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training the toy tokenizer" not in again.stdout and "training the toy transformer" not in again.stdout
