"""The toy main job: a tiny transformer trained from the token cache of the moving-shapes toy data on CPU.

The whole job is one command, ``python -m infstar_jax.toy --workdir RUN`` (``infstar_jax/toy.py``): toy data
(``python -m infstar_jax.data.toy --out DATA --num N --frames 17 --size 32x32``: 1 s clips, 1:1) encoded with the toy
tokenizer (``configs/toy_tokenizer.py``, spatial stride 8: 4x4 latents of 64 channels) and the tiny text encoder
below into a token cache; then ``python -m infstar_jax.train --config configs/toy.py --workdir RUN
--config.data.cache=CACHE``.

Schedule: 4 scales per clip (1, 2, 3, 4 latent pixels a side, 1:1), 17 frames = 5 latent frames = the image clip
plus one 4-frame clip: 8 scales, 150 visual tokens, repetitions image [3]*4, video [3, 3, 2, 1]; scales of 9 or
more tokens a frame (3x3, 4x4) use the 64-bit detail head, the others the 16-bit semantic head
(``semantic_scales=2`` agrees for the sampler). All scales are trained (the released var-len outcomes need 14+
scales per clip). ~1.4 M parameters; fp32 on CPU.
"""

import ml_collections

from infstar_jax.config import base_config
from infstar_jax.training.tasks import add_training_config

TEXT_DIM = 64  # width of the tiny text encoder's features (its d_model)


def get_config(arg: str | None = None):
    del arg
    c = base_config()
    c.model.architecture = None
    c.model.overrides = dict(depth=4, embed_dim=128, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=384,
                             text_dim=TEXT_DIM, text_maxlen=64)
    c.precision = "fp32"
    c.remat = "none"
    c.mesh.shape = {"data": 1, "fsdp": -1, "context": 1, "tensor": 1}
    c.schedule = ml_collections.ConfigDict(dict(
        resolution="480p", aspect="1:1", duration=1, num_scales=4, image_rep=(3, 3, 3, 3), video_rep=(3, 3, 2, 1),
        semantic_scales=2, detail_scale_min_tokens=9))
    # Tiny text encoder (a T5 encoder of these sizes; its tokenizer and weights come with the toy job).
    c.text = ml_collections.ConfigDict(dict(d_model=TEXT_DIM, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                            max_length=64))
    add_training_config(c, "transformer")
    c.seed = 0
    c.train.update(dict(steps=600, batch_size=8, lr=1e-3, lr_schedule="cosine", warmup_steps=50,
                        end_lr_ratio=0.1, var_len=False, pad_to_multiple=16))
    c.data.update(dict(text_buckets=(16, 32, 64), video_frames=17, num_threads=2, prefetch=4))
    c.checkpoint.update(dict(every_steps=200, max_to_keep=2))
    c.log.update(dict(every_steps=25))
    return c
