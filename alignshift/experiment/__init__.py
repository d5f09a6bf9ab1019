"""The experiment stage: what an experiment script runs.

* :mod:`~alignshift.experiment.driver` — the seed loop (data → reference → methods → evaluation
  → aggregate and results files) and the :class:`~alignshift.experiment.driver.Experiment`
  hooks; its defaults are the ShiftBench pipeline (``shift_demo.py``, ``iw_dpo.py``,
  ``robust_dpo.py``);
* :mod:`~alignshift.experiment.evaluators` — what each experiment measures;
* :mod:`~alignshift.experiment.tuning` — equal tuning budgets (``tuning:``): every method's
  configurations, the selection split of the training pairs, the selected configuration;
* :mod:`~alignshift.experiment.dora`, :mod:`~alignshift.experiment.flr`,
  :mod:`~alignshift.experiment.preference_hf` — the hooks of ``dora.py``, ``flr.py`` and
  ``preference_hf.py`` (DoRA's classifier fit, FLR's reward-model rows and mining, HF model
  and mesh loading).
"""
