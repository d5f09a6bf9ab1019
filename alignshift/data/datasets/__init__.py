"""Adapters for the papers' public datasets, plus your own files, behind one registry.

    from alignshift.data.datasets import load_dataset_splits, DATASETS
    splits = load_dataset_splits("pku_safe_rlhf_iw", source="PKU-Alignment/PKU-SafeRLHF", seed=0)
    splits.train, splits.val, splits.test          # lists of PreferenceExample
    splits = load_dataset_splits("shp", source="/data/shp_local_copy", min_score_ratio=3.0)

``source`` is a hub name (downloaded by ``datasets`` -- only when you ask for it) or a local
file/folder in the dataset's published layout (see each module). ``DATASETS[name].schema``
says whether the field names were confirmed from the published dataset card or inferred.
Every loader raises :class:`alignshift.data.DataError` naming the dataset, row and field on
malformed rows, or, with ``load_dataset_splits(..., skip_bad_rows=True)`` (the CLI's
``--skip-bad-rows``), drops them and counts them (``info["skipped_rows"]``, and the
:class:`~alignshift.data.schema.SkippedRows` ``report`` when one is passed). CALI (an IW-DPO dataset) has no adapter: no public schema could be
established (see ``docs``/report); convert it to the ``preference`` layout instead.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from alignshift.data.schema import SkippedRows

from .base import CandidateExample, DatasetSplits, best_worst_pairs, load_rows, shift_split, zscore_columns
from .emotion import emotion_mixture_pairs, emotion_prompts, load_emotion
from .generic import load_candidates_file, load_preference_file
from .helpsteer2 import WDPO_MIXTURES, helpsteer2_mixture_pairs, load_helpsteer2_candidates
from .hh_rlhf import load_hh_rlhf
from .pku_safe_rlhf import iw_dpo_splits, load_pku_safe_rlhf
from .shp import load_shp, shp_domain_shift_splits
from .ultrafeedback import load_ultrafeedback_binarized, load_ultrafeedback_candidates, ultrafeedback_pairs

__all__ = [
    "DatasetSpec", "DATASETS", "load_dataset_splits", "register_dataset",
    "CandidateExample", "DatasetSplits", "best_worst_pairs", "load_rows", "shift_split", "zscore_columns",
    "load_pku_safe_rlhf", "iw_dpo_splits", "load_shp", "shp_domain_shift_splits",
    "load_helpsteer2_candidates", "helpsteer2_mixture_pairs", "WDPO_MIXTURES",
    "load_ultrafeedback_binarized", "load_ultrafeedback_candidates", "ultrafeedback_pairs",
    "load_hh_rlhf", "load_emotion", "emotion_prompts", "emotion_mixture_pairs",
    "load_preference_file", "load_candidates_file",
]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    hub_name: str  # default source ("" = a local path is required)
    # build(source, *, skip_bad_rows, report, **kwargs) -> DatasetSplits; skip_bad_rows/report go
    # to the row loaders (alignshift.data.schema.convert_rows)
    build: Callable[..., DatasetSplits]
    kind: str  # "pairs" | "candidates" | "classification"
    schema: str  # "card" (field names confirmed from the published card/rows) | "inferred"
    description: str


def _carve_val(train: list, val_ratio: float, seed: int) -> tuple[list, list]:
    if not val_ratio:
        return train, []
    perm = np.random.default_rng(seed).permutation(len(train))
    n_val = max(1, round(val_ratio * len(train)))
    return [train[i] for i in perm[n_val:]], [train[i] for i in perm[:n_val]]


def _has_local_split(source: str, split: str) -> bool:
    """Whether optional split ``split`` exists: a local file is the train split only, a local
    folder has it if it holds files for it, a hub dataset is asked."""
    import os

    from .base import _local_files

    if os.path.isfile(source):  # a single file is the train split
        return False
    if not os.path.isdir(source):  # a hub name: its splits are looked up there
        return True
    found = _local_files(source, split)
    return bool(found and found[1])


def _pairs_builder(loader, train_split, val_split, test_split, *, optional_local=False):
    def build(source, *, val_ratio: float = 0.0, seed: int = 0, max_rows=None, **kw) -> DatasetSplits:
        def maybe(split):
            if not split or (optional_local and not _has_local_split(source, split)):
                return None
            return loader(source, split, max_rows=max_rows, **kw)

        train = loader(source, train_split, max_rows=max_rows, **kw)
        val = maybe(val_split)
        if val is None:
            train, val = _carve_val(train, val_ratio, seed)
        test = maybe(test_split) or []
        return DatasetSplits(train, val, test, {"n_train": len(train), "n_val": len(val), "n_test": len(test)})
    return build


def _pku_plain(source, *, label="helpfulness", val_ratio=0.0, seed=0, max_rows=None, name=None, **bad):
    return _pairs_builder(lambda s, sp, **k: load_pku_safe_rlhf(s, sp, label=label, name=name, **k),
                          "train", None, "test")(source, val_ratio=val_ratio, seed=seed, max_rows=max_rows, **bad)


def _helpsteer2_mixture(source, *, weights=None, mixture=None, zscore=True, min_gap=0.0, objectives=None,
                        max_rows=None, train_split="train", test_split="validation", val_ratio=0.0, seed=0, **bad):
    if mixture is not None:
        if mixture not in WDPO_MIXTURES:
            raise ValueError(f"unknown WDPO mixture {mixture!r}; known: {sorted(WDPO_MIXTURES)}")
        weights = WDPO_MIXTURES[mixture]
    weights = weights or {"helpfulness": 0.5, "correctness": 0.5}
    objs = tuple(objectives) if objectives else None

    def pairs(split):
        c = load_helpsteer2_candidates(source, split, objectives=objs, max_rows=max_rows, **bad)
        return helpsteer2_mixture_pairs(c, weights, zscore=zscore, min_gap=min_gap)

    train, val = _carve_val(pairs(train_split), val_ratio, seed)
    test = pairs(test_split) if test_split else []
    return DatasetSplits(train, val, test, {"weights": dict(weights), "n_train": len(train), "n_test": len(test)})


def _ultrafeedback(source, *, weights=None, zscore=False, min_gap=0.0, max_rows=None, val_ratio=0.0, seed=0,
                   test_ratio=0.0, **bad):
    pairs = ultrafeedback_pairs(load_ultrafeedback_candidates(source, "train", max_rows=max_rows, **bad), weights,
                                zscore=zscore, min_gap=min_gap)
    rest, test = _carve_val(pairs, test_ratio, seed + 1)
    train, val = _carve_val(rest, val_ratio, seed)
    return DatasetSplits(train, val, test, {"weights": dict(weights or {"overall": 1.0})})


def _emotion(source, *, max_rows=None, name=None, skip_bad_rows=False, report=None, **_):
    bad = dict(name=name, max_rows=max_rows, skip_bad_rows=skip_bad_rows, report=report)
    return DatasetSplits(load_emotion(source, "train", **bad), load_emotion(source, "validation", **bad),
                         load_emotion(source, "test", **bad), {"kind": "classification"})


def _candidates(source, *, weights=None, zscore=False, min_gap=0.0, max_rows=None, val_ratio=0.0, seed=0,
                test_split=None, **bad):
    def pairs(split):
        return best_worst_pairs(load_candidates_file(source, split, max_rows=max_rows, **bad), weights or {"score": 1.0},
                                zscore=zscore, min_gap=min_gap)
    train, val = _carve_val(pairs("train"), val_ratio, seed)
    return DatasetSplits(train, val, pairs(test_split) if test_split else [], {})


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    DATASETS[spec.name] = spec
    return spec


for _spec in (
    DatasetSpec("pku_safe_rlhf", "PKU-Alignment/PKU-SafeRLHF", _pku_plain, "pairs", "card",
                "PKU-SafeRLHF pairs (train/test), chosen by helpfulness (label='safety': by safety)"),
    DatasetSpec("pku_safe_rlhf_iw", "PKU-Alignment/PKU-SafeRLHF", lambda s, **k: iw_dpo_splits(s, **k), "pairs",
                "card", "PKU-SafeRLHF with the IW-DPO deployment-shift split recipe (docs/methods.md §8)"),
    DatasetSpec("shp", "stanfordnlp/SHP", _pairs_builder(load_shp, "train", "validation", "test"), "pairs", "card",
                "SHP pairs with score-ratio / per-post / domain filtering"),
    DatasetSpec("shp_domain_shift", "stanfordnlp/SHP", lambda s, **k: shp_domain_shift_splits(s, **k), "pairs",
                "card", "SHP domain shift: deployment subreddits 25% of D_tr, D_v/D_te from them"),
    DatasetSpec("helpsteer2_mixture", "nvidia/HelpSteer2", _helpsteer2_mixture, "pairs", "card",
                "HelpSteer2 (or ArmoRM-scored generations) -> WDPO attribute-mixture best-vs-worst pairs"),
    DatasetSpec("ultrafeedback_binarized", "HuggingFaceH4/ultrafeedback_binarized",
                _pairs_builder(load_ultrafeedback_binarized, "train_prefs", None, "test_prefs"), "pairs", "card",
                "UltraFeedback binarized pairs (train_prefs/test_prefs)"),
    DatasetSpec("ultrafeedback", "openbmb/UltraFeedback", _ultrafeedback, "candidates", "inferred",
                "UltraFeedback multi-candidate completions -> best-vs-worst pairs by weighted ratings"),
    DatasetSpec("hh_rlhf", "Anthropic/hh-rlhf", _pairs_builder(load_hh_rlhf, "train", None, "test"), "pairs", "card",
                "Anthropic HH-RLHF pairs (data_dir=harmless-base|helpful-base|...; format=chat|raw)"),
    DatasetSpec("emotion", "dair-ai/emotion", _emotion, "classification", "card",
                "Emotion tweets (text, label) for the reward-mixture experiment's classifier and prompts"),
    DatasetSpec("preference", "", _pairs_builder(load_preference_file, "train", "validation", "test",
                                                 optional_local=True), "pairs", "n/a",
                "your own pairs: prompt/chosen/rejected (strings or message lists), optional weight; a folder "
                "may hold train/validation/test files (validation and test optional)"),
    DatasetSpec("candidates", "", _candidates, "candidates", "n/a",
                "your own K candidates with scores (+ DoRA probs/source_ids) -> best-vs-worst pairs"),
):
    register_dataset(_spec)


def load_dataset_splits(name: str, source: str | None = None, *, skip_bad_rows: bool = False,
                        report: SkippedRows | None = None, **kwargs) -> DatasetSplits:
    """Load registered dataset ``name`` from ``source`` (default: its hub name) into splits.

    A malformed row raises :class:`~alignshift.data.DataError` naming the dataset, row and
    field; with ``skip_bad_rows`` it is dropped and counted in ``report`` (a new
    :class:`~alignshift.data.schema.SkippedRows` if None) and ``info["skipped_rows"]``."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; registered: {sorted(DATASETS)}")
    spec = DATASETS[name]
    src = source or spec.hub_name
    if not src:
        raise ValueError(f"dataset {name!r} needs a source (a local file or folder)")
    report = SkippedRows() if report is None else report
    out = spec.build(src, skip_bad_rows=skip_bad_rows, report=report, **kwargs)
    out.info.setdefault("dataset", name)
    out.info.setdefault("source", src)
    if report.count:
        out.info["skipped_rows"] = {"count": report.count, "by_source": dict(report.by_source)}
    return out
