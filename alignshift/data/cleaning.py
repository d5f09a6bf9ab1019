"""Row validation of a loaded data set's splits before encoding: malformed rows raise a
:class:`~alignshift.data.schema.DataError` naming the split, row and field, or are dropped and
counted (``data.skip_bad_rows``); over-long rows follow ``data.truncation``.

Used by every experiment that reads rows it did not generate itself (the ShiftBench pipeline,
``experiments/preference_hf.py``); the row and length checks are
:func:`~alignshift.data.schema.validate_example` and :func:`~alignshift.data.schema.check_lengths`.
"""

from __future__ import annotations

import dataclasses

from alignshift.data.schema import DataError, SkippedRows, check_lengths, validate_example

__all__ = ["clean_splits"]


def _token_counter(tok):
    """``count(kind, text)``: tokens of a prompt (bos included) or completion (eos included)."""
    def count(kind, text):
        if hasattr(tok, "bos_id"):  # our WordTokenizer
            return len(tok.encode(text, add_bos=True)) if kind == "prompt" else len(tok.encode(text)) + 1
        return len(tok(text, add_special_tokens=(kind == "prompt"))["input_ids"]) + (kind == "completion")
    return count


def _row_number(row, position: int) -> int:
    """The row number errors name: ``meta["row"]`` (the row of the dataset file/split a real-data
    adapter read it from) when the example carries one, else its position in the split."""
    meta = getattr(row, "meta", None) if not isinstance(row, dict) else row.get("meta")
    r = meta.get("row") if isinstance(meta, dict) else None
    return r if isinstance(r, int) and not isinstance(r, bool) else position


def clean_splits(data, dcfg, tok, name: str, *, lengths=None, report: SkippedRows | None = None):
    """Validate the train/val/test rows of ``data`` (``data.skip_bad_rows``, ``data.truncation``):
    the first bad row raises :class:`DataError` naming ``<name>/<split> row i`` (``i``: the row's
    ``meta["row"]`` when a dataset adapter set it, else its position) and the field, or,
    with ``skip_bad_rows``, bad (and, unless truncating, over-long) rows are dropped, counted,
    printed and recorded in ``data.info["skipped_rows"]``. Returns ``data`` with the kept rows.

    Lengths are counted with ``tok`` as :func:`alignshift.data.encode_pairs` sees them, or by
    ``lengths`` (see :func:`~alignshift.data.schema.check_lengths`; chat templates). ``report``
    continues an earlier one (rows a dataset adapter already skipped), so the record is the total."""
    report = SkippedRows() if report is None else report
    count, kept = (None if lengths is not None else _token_counter(tok)), {}
    policy = "skip" if (dcfg.truncation == "error" and dcfg.skip_bad_rows) else dcfg.truncation
    for split in ("train", "val", "test"):
        rows = getattr(data, split, None)
        if not isinstance(rows, list):
            continue
        src, idx, exs = f"{name}/{split}", [], []
        for i, r in enumerate(rows):
            i = _row_number(r, i)
            try:
                exs.append(validate_example(r, i, source=src))
                idx.append(i)
            except DataError as e:
                if not dcfg.skip_bad_rows:
                    raise
                report.add(src, e)
        kept[split] = check_lengths(exs, count, max_prompt_len=dcfg.max_prompt_len,
                                    max_completion_len=dcfg.max_completion_len, policy=policy, source=src,
                                    report=report, indices=idx, lengths=lengths)
        if rows and not kept[split]:
            raise DataError(f"{src}: no valid rows left ({report.by_source.get(src, 0)} skipped)")
    if report.count:
        print(f"data: {report.summary()}", flush=True)
        if isinstance(getattr(data, "info", None), dict):
            data.info["skipped_rows"] = {"count": report.count, "by_source": dict(report.by_source)}
    if all(kept[k] is getattr(data, k) or kept[k] == getattr(data, k) for k in kept):
        return data
    if dataclasses.is_dataclass(data):
        return dataclasses.replace(data, **kept)
    for k, v in kept.items():
        setattr(data, k, v)
    return data
