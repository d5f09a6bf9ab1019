"""Stanford Human Preferences (``stanfordnlp/SHP``): domain shift across subreddits.

Published schema: ``post_id``, ``domain`` (subreddit + split suffix, e.g. ``askculinary_train``),
``upvote_ratio``, ``history`` (the post: title + body), ``c_root_id_{A,B}``,
``created_at_utc_{A,B}``, ``score_{A,B}``, ``human_ref_{A,B}`` (the two comments),
``labels`` (1 if A is preferred, 0 if B), ``seconds_difference``, ``score_ratio``
(preferred score / other score, >= 2 by construction as published). Splits: ``train``,
``validation``, ``test``; 18 subreddit domains (hub folders per domain via ``data_dir``).

Mapping: prompt = ``history``; chosen = the preferred comment. ``meta``: ``domain`` (the
subreddit, with the ``_train``/``_validation``/``_test`` suffix removed), ``score_ratio``,
``score_chosen``/``score_rejected``, ``post_id``, ``upvote_ratio``.

Filtering (:func:`load_shp`): ``min_score_ratio`` keeps pairs whose preference is clear
(the SHP authors recommend a ratio of at least 2 and training on at most a few pairs per
post); ``max_pairs_per_post`` caps pairs per post (posts with many comments otherwise
dominate); ``domains`` keeps a subset. :func:`shp_domain_shift_splits` builds the IW-DPO
style domain-shift split: deployment domains make up ``deploy_fraction`` of ``D_tr`` and
give the validation and test sets.
"""

from __future__ import annotations

from typing import Sequence

from alignshift.data.schema import DataError, PreferenceExample, SkippedRows, convert_rows

from .base import DatasetSplits, load_rows, require, require_number, require_text, shift_split

__all__ = ["HUB_NAME", "shp_row_to_example", "load_shp", "shp_domain_shift_splits"]

HUB_NAME = "stanfordnlp/SHP"
NAME = "shp"


def _domain(d: str) -> str:
    for suffix in ("_train", "_validation", "_test"):
        if d.endswith(suffix):
            return d[: -len(suffix)]
    return d


def shp_row_to_example(row: dict, i: int) -> PreferenceExample:
    prompt = require_text(row, "history", i, NAME)
    a = require_text(row, "human_ref_A", i, NAME)
    b = require_text(row, "human_ref_B", i, NAME)
    lab = require(row, "labels", i, NAME)
    if isinstance(lab, bool) or lab not in (0, 1):
        raise DataError(f"{NAME} row {i}: field 'labels' must be 0 or 1, got {lab!r}")
    domain = require_text(row, "domain", i, NAME)
    ratio = require_number(row, "score_ratio", i, NAME)
    sa, sb = row.get("score_A"), row.get("score_B")
    chosen, rejected = (a, b) if lab == 1 else (b, a)
    if chosen.strip() == rejected.strip():
        raise DataError(f"{NAME} row {i}: field 'human_ref_B' is identical to field 'human_ref_A'")
    meta = {"source": NAME, "row": i, "domain": _domain(domain), "score_ratio": ratio,
            "score_chosen": sa if lab == 1 else sb, "score_rejected": sb if lab == 1 else sa,
            "post_id": row.get("post_id"), "upvote_ratio": row.get("upvote_ratio")}
    return PreferenceExample(prompt, chosen, rejected, meta)


def load_shp(source: str = HUB_NAME, split: str = "train", *, data_dir: str | None = None,
             domains: Sequence[str] | None = None, min_score_ratio: float = 2.0,
             max_pairs_per_post: int | None = 5, max_rows: int | None = None, skip_bad_rows: bool = False,
             report: SkippedRows | None = None) -> list[PreferenceExample]:
    """SHP pairs of ``split`` after score-ratio / per-post / domain filtering (module docstring).

    Pairs of a post are kept in order of decreasing score ratio up to ``max_pairs_per_post``.
    With ``skip_bad_rows`` malformed rows are dropped and counted in ``report``.
    """
    rows = load_rows(source, split, data_dir=data_dir, max_rows=max_rows, dataset=NAME)
    exs = convert_rows(rows, shp_row_to_example, source=f"{NAME}/{split}", skip_bad_rows=skip_bad_rows,
                       report=report)
    if domains is not None:
        wanted = {_domain(d) for d in domains}
        exs = [e for e in exs if e.meta["domain"] in wanted]
    exs = [e for e in exs if e.meta["score_ratio"] >= min_score_ratio]
    if max_pairs_per_post is not None:
        by_post: dict = {}
        for e in sorted(exs, key=lambda e: -e.meta["score_ratio"]):
            by_post.setdefault(e.meta["post_id"], []).append(e)
        keep = {id(e) for v in by_post.values() for e in v[:max_pairs_per_post]}
        exs = [e for e in exs if id(e) in keep]
    return exs


def shp_domain_shift_splits(source: str = HUB_NAME, *, deploy_domains: Sequence[str],
                            train_domains: Sequence[str] | None = None, deploy_fraction: float = 0.25,
                            val_ratio: float = 1.0 / 50.0, n_test: int | None = None,
                            use_test_split: bool = True, seed: int = 0, **load_kw) -> DatasetSplits:
    """Domain shift: ``D_tr`` = pairs of ``train_domains`` (default: every other domain) plus
    deployment-domain pairs making up ``deploy_fraction`` of it; ``D_v``/``D_te`` from the
    ``deploy_domains`` (``D_te`` from SHP's ``test`` split with ``use_test_split``)."""
    deploy = {_domain(d) for d in deploy_domains}
    if not deploy:
        raise ValueError("deploy_domains must name at least one subreddit")
    train = load_shp(source, "train", **load_kw)
    if train_domains is not None:
        allowed = deploy | {_domain(d) for d in train_domains}
        train = [e for e in train if e.meta["domain"] in allowed]
    test = load_shp(source, "test", **load_kw) if use_test_split else None
    out = shift_split(train, lambda e: e.meta["domain"] in deploy, deploy_fraction=deploy_fraction,
                      val_ratio=val_ratio, n_test=n_test, test_examples=test, seed=seed)
    out.info.update({"dataset": NAME, "recipe": "domain_shift", "deploy_domains": sorted(deploy)})
    return out
