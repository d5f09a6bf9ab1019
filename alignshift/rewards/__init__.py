"""Reward signals and reward-model evaluation.

Modules (import them directly; this package imports nothing eagerly so that each stays light):

- :mod:`alignshift.rewards.flr` — follow-up likelihood as reward (FLR) and the Direct baseline.
- :mod:`alignshift.rewards.evaluate` — pairwise accuracy / correlation of a reward on local benchmark files.
- :mod:`alignshift.rewards.source_classifier` — DoRA's target-vs-source classifier and its calibration report.
"""
