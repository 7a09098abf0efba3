"""The toy tokenizer: a tiny video VAE with multi-scale BSQ trained on the moving-shapes toy data on CPU (issue 9).

    python -m infstar_jax.train --config configs/toy_tokenizer.py --workdir runs/toy_tok
    python -m infstar_jax.train --config configs/toy_tokenizer.py:sqd --workdir runs/toy_tok_sqd

The run generates its data (``data.toy`` videos of 32x32 pixels, 17 frames, seed 0) and a held-out set (``eval.toy``
videos, seed 1) under ``WORKDIR/toy_data`` unless ``--config.data.metadata`` / ``--config.eval.metadata`` name other
videos. The VAE has two DC down-sampling blocks (spatial stride 8 with the absorbed patchify, temporal 4): clips of
17 frames at 32x32 give 5x4x4 latents (a 2-core CPU runs ~2 steps/s, where stride 16 at 64x64 ran one step per
~1.7 s for the same latent size): the image pyramid (1x1 .. 4x4) plus one 4-frame clip
pyramid, 4 scales per clip with repetitions image [3]*4, video [3, 3, 2, 1], the 3x3 and 4x4 scales on the 64-bit
detail quantiser (the toy transformer's schedule, ``configs/toy.py``). The exported tokenizer (``WORKDIR/export/vae``)
is what the toy transformer's token cache is encoded with.

Argument: ``sqd`` turns on stochastic quantizer depth (p = 0.5, N uniform over 1..3); default off.
"""

import ml_collections

from infstar_jax.training.tasks import add_training_config


def get_config(arg: str | None = None):
    if arg not in (None, "", "sqd"):
        raise ValueError(f"configs/toy_tokenizer.py takes no argument or 'sqd', got {arg!r}")
    c = ml_collections.ConfigDict()
    c.task = "tokenizer"
    c.precision = "fp32"
    c.vae = ml_collections.ConfigDict(dict(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 32, 32),
        layers_per_block=1, temporal_compression_list=(2, 2), spatial_compression_list=(2, 2)))
    c.mesh = ml_collections.ConfigDict({"shape": {"data": -1, "fsdp": 1, "context": 1, "tensor": 1}})
    c.schedule = ml_collections.ConfigDict(dict(num_scales=4, image_rep=(3, 3, 3, 3), video_rep=(3, 3, 2, 1),
                                                detail_scale_min_tokens=9))
    add_training_config(c, "tokenizer")
    c.seed = 0
    c.train.update(dict(steps=2000, batch_size=2, lr=2e-3, lr_schedule="cosine", warmup_steps=20, end_lr_ratio=0.05,
                        grad_clip=1.0))
    # L2 rather than the reference's default L1: the frames are mostly black, and L1 holds the toy model on the
    # all-black reconstruction (~16 dB) for many more steps.
    c.loss.update(dict(recon_loss_type="l2", l1_weight=4.0, lfq_weight=0.0))
    c.sqd.update(dict(prob=0.5 if arg == "sqd" else 0.0, drop_weights=()))
    c.data.update(dict(toy=256, toy_size=32, video_frames=17, num_threads=2, prefetch=2))
    c.eval.update(dict(every_steps=250, toy=16, num_videos=16, batch_size=4))
    c.checkpoint.update(dict(every_steps=250, max_to_keep=2))
    c.log.update(dict(every_steps=20))
    return c
