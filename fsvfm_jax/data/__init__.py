"""Pretraining data: sources, the Grain pipeline, dataset statistics, synthetic faces.

Modules: records (record format, decoding, validation), sources (folder / ArrayRecord),
pipeline (make_pretrain_dataset / make_pretrain_iterator, Orbax helpers), stats
(mean/std), synthetic (face-like test data). Import the one you need, e.g.
``from fsvfm_jax.data import pipeline``.
"""
