"""Training data: metadata (reference jsonl and native), video decoding, grain pipelines, token caches, toy data.

Modules are imported on use (``from infstar_jax.data import pipeline``) so that reading metadata does not pull in
grain, PyAV or tensorstore.
"""
