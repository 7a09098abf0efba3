"""infstar-jax: InfinityStar (discrete spacetime next-scale video generation) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="infstar-jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of InfinityStar for TPU pods and GPU clusters",
    packages=find_packages(include=["infstar_jax", "infstar_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12",
        "grain>=0.2.12",
        "tensorstore>=0.1.70",
        "ml-collections>=1.0",
        "numpy>=1.26",
        "tqdm>=4.60",
    ],
    extras_require={
        "convert": ["torch==2.13.0", "safetensors>=0.4"],
        "video": ["av>=12", "pillow>=10"],
        "text": ["sentencepiece>=0.2", "tokenizers>=0.20"],
        "test": [
            "pytest>=8",
            "torch==2.13.0",
            "safetensors>=0.4",
            "av>=12",
            "pillow>=10",
            "sentencepiece>=0.2",
            "tokenizers>=0.20",
            "transformers>=4.50",
            # Ahead-of-time compilation for TPU topologies on a CPU host (tests/test_aot.py); the pin of jax 0.10.2's
            # own [tpu] extra: it moves with jax.
            "libtpu==0.0.42.*; sys_platform == 'linux'",
        ],
    },
)
