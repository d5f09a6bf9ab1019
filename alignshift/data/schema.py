"""Preference-example schema and validation.

A preference example is a ``(prompt, chosen, rejected)`` triple of plain strings
plus a free-form ``meta`` dict (scenario bookkeeping such as topic, category and
split).  :func:`validate_example` / :func:`validate_examples` turn raw rows
(dicts or :class:`PreferenceExample`) into validated examples and raise
:class:`DataError` with a message that names the row index and the offending
field, e.g. ``row 17: field 'chosen' is empty`` (prefixed by the file or data set
name when one is given: ``data/train.jsonl row 17: field 'chosen' is empty``).

Checks: each text field is present, a ``str`` (``bytes`` are accepted only if they
are valid UTF-8), not empty or whitespace-only, and holds no unpaired surrogate
(what a non-UTF-8 byte becomes when a file is decoded with ``errors="surrogateescape"``);
``chosen`` differs from ``rejected``; ``meta`` is a dict. :func:`read_jsonl_rows`
reads a JSONL file and names the file and line of undecodable bytes or invalid JSON;
:func:`check_lengths` applies the over-length policy (``truncate`` | ``error`` |
``skip``). With ``skip_bad_rows=True`` bad rows are dropped and counted in a
:class:`SkippedRows` report instead of raising (the CLI's ``--skip-bad-rows``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

__all__ = [
    "DataError",
    "PreferenceExample",
    "SkippedRows",
    "validate_example",
    "validate_examples",
    "convert_rows",
    "read_jsonl_rows",
    "check_lengths",
    "TEXT_FIELDS",
    "TRUNCATION_POLICIES",
]

#: The required text fields of a preference example, in order.
TEXT_FIELDS: tuple[str, ...] = ("prompt", "chosen", "rejected")

#: What to do with a row longer than the token budget: cut it (encode's policy: keep the end
#: of the prompt, the start of the response), refuse it, or drop it.
TRUNCATION_POLICIES: tuple[str, ...] = ("truncate", "error", "skip")


class DataError(ValueError):
    """A malformed data row. The message names the file (when known), the row index and the field."""


@dataclass(frozen=True)
class PreferenceExample:
    prompt: str
    chosen: str
    rejected: str
    meta: dict = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected, "meta": dict(self.meta)}


@dataclass
class SkippedRows:
    """What ``skip_bad_rows=True`` dropped: a count per source and the first reasons."""

    count: int = 0
    by_source: dict = field(default_factory=dict)
    reasons: list = field(default_factory=list)  # the first ``keep`` error messages
    keep: int = 20

    def add(self, source: str | None, error: Exception) -> None:
        self.count += 1
        key = source or "<rows>"
        self.by_source[key] = self.by_source.get(key, 0) + 1
        if len(self.reasons) < self.keep:
            self.reasons.append(str(error))

    def summary(self) -> str:
        if not self.count:
            return "no rows skipped"
        per = ", ".join(f"{k}: {v}" for k, v in self.by_source.items())
        more = f" (first {len(self.reasons)} shown)" if self.count > len(self.reasons) else ""
        return f"skipped {self.count} bad row(s) ({per}){more}:\n  " + "\n  ".join(self.reasons)


def _where(source: str | None, index: int) -> str:
    return f"{source} row {index}" if source else f"row {index}"


def _error(index: int, name: str, problem: str, source: str | None = None) -> DataError:
    return DataError(f"{_where(source, index)}: field '{name}' {problem}")


def _text(value: Any, index: int, name: str, source: str | None) -> str:
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise _error(index, name, f"is not valid UTF-8 (byte 0x{value[e.start]:02x} at offset {e.start})",
                         source) from None
    if not isinstance(value, str):
        raise _error(index, name, f"must be a str, got {type(value).__name__}", source)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates: undecodable bytes smuggled in by surrogateescape
        raise _error(index, name, f"is not valid UTF-8 (unpaired surrogate {value[e.start]!r} at character "
                     f"{e.start})", source) from None
    if not value.strip():
        raise _error(index, name, "is empty", source)
    return value


def validate_example(row: Mapping[str, Any] | PreferenceExample, index: int, *,
                     source: str | None = None) -> PreferenceExample:
    """Validate one row and return it as a :class:`PreferenceExample`.

    Checks, in order: each of ``prompt``/``chosen``/``rejected`` is present, is a
    ``str`` (or UTF-8 ``bytes``) that is valid UTF-8 and not empty or whitespace-only;
    ``chosen`` and ``rejected`` differ (compared after stripping surrounding whitespace);
    ``meta`` (optional) is a dict. Raises :class:`DataError` naming ``source`` (a file or
    data-set name, optional), ``index`` and the field otherwise.
    """
    if isinstance(row, PreferenceExample):
        values: Mapping[str, Any] = row.as_dict()
    elif isinstance(row, Mapping):
        values = row
    else:
        raise DataError(f"{_where(source, index)}: expected a dict or PreferenceExample, got {type(row).__name__}")

    texts = {}
    for name in TEXT_FIELDS:
        if name not in values:
            raise _error(index, name, "is missing", source)
        texts[name] = _text(values[name], index, name, source)
    if texts["chosen"].strip() == texts["rejected"].strip():
        raise _error(index, "rejected", "is identical to field 'chosen'", source)

    meta = values.get("meta", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, Mapping):
        raise _error(index, "meta", f"must be a dict, got {type(meta).__name__}", source)

    if isinstance(row, PreferenceExample):
        return row
    return PreferenceExample(prompt=texts["prompt"], chosen=texts["chosen"], rejected=texts["rejected"],
                             meta=dict(meta))


def convert_rows(rows: Iterable[Any], convert: Callable[[Any, int], Any], *, source: str | None = None,
                 skip_bad_rows: bool = False, report: SkippedRows | None = None) -> list:
    """``[convert(row, i) for i, row in enumerate(rows)]``; a :class:`DataError` raised by
    ``convert`` propagates, or, with ``skip_bad_rows``, drops the row and is counted in
    ``report``. The generic form of :func:`validate_examples` for data-set adapters."""
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(convert(row, i))
        except DataError as e:
            if not skip_bad_rows:
                raise
            if report is not None:
                report.add(source, e)
    return out


def validate_examples(rows: Iterable[Mapping[str, Any] | PreferenceExample], *, source: str | None = None,
                      skip_bad_rows: bool = False, report: SkippedRows | None = None) -> list[PreferenceExample]:
    """Validate every row (see :func:`validate_example`). The first bad row raises, unless
    ``skip_bad_rows``: then bad rows are dropped and counted in ``report``."""
    return convert_rows(rows, lambda r, i: validate_example(r, i, source=source), source=source,
                        skip_bad_rows=skip_bad_rows, report=report)


def read_jsonl_rows(path: str, *, skip_bad_rows: bool = False, report: SkippedRows | None = None) -> list[dict]:
    """The JSON objects of a JSONL file, one per non-blank line. A line that is not valid
    UTF-8, not valid JSON or not an object raises :class:`DataError` naming the file and the
    line (1-based), or is skipped and counted with ``skip_bad_rows``."""
    rows: list[dict] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path} line {lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                    f"{e.start + 1})") from None
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}")
            except DataError as e:
                if not skip_bad_rows:
                    raise
                if report is not None:
                    report.add(path, e)
                continue
            rows.append(row)
    return rows


def check_lengths(examples: Iterable[PreferenceExample], count_tokens: Callable[[str, str], int] | None = None, *,
                  max_prompt_len: int, max_completion_len: int, policy: str = "truncate",
                  source: str | None = None, report: SkippedRows | None = None,
                  indices: Iterable[int] | None = None,
                  lengths: Callable[[PreferenceExample, int], Mapping[str, int]] | None = None,
                  ) -> list[PreferenceExample]:
    """Apply the over-length policy. ``count_tokens(kind, text)`` gives the token count of a
    ``"prompt"`` (bos included) or a ``"completion"`` (eos included) as the encoder will see it;
    or ``lengths(example, row) -> {"prompt": n, "chosen": n, "rejected": n}`` gives them when
    they depend on the whole example (a chat template renders the prompt's turns and wraps
    each response in them: :func:`alignshift.data.chat.chat_token_lengths`).

    ``truncate``: return the examples unchanged (the encoder keeps the end of the prompt and
    the start of the response). ``error``: raise :class:`DataError` naming the row, the field
    and both lengths. ``skip``: drop over-long rows, counted in ``report``. ``indices`` are the
    row numbers to report (default ``0..N-1``; pass the original ones after skipping rows).
    """
    if policy not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation policy must be one of {TRUNCATION_POLICIES}, got {policy!r}")
    if (count_tokens is None) == (lengths is None):
        raise ValueError("check_lengths: pass exactly one of count_tokens and lengths")
    examples = list(examples)
    if policy == "truncate":
        return examples
    if lengths is None:
        def lengths(ex, i):
            return {"prompt": count_tokens("prompt", ex.prompt), "chosen": count_tokens("completion", ex.chosen),
                    "rejected": count_tokens("completion", ex.rejected)}
    indices = list(range(len(examples))) if indices is None else list(indices)
    out = []
    for i, ex in zip(indices, examples):
        problem = None
        n_tokens = lengths(ex, i)
        n = n_tokens["prompt"]
        if n > max_prompt_len:
            problem = _error(i, "prompt", f"has {n} tokens > max_prompt_len={max_prompt_len} "
                             f"(truncation policy {policy!r})", source)
        else:
            for name in ("chosen", "rejected"):
                n = n_tokens[name]
                if n > max_completion_len:
                    problem = _error(i, name, f"has {n} tokens > max_completion_len={max_completion_len} "
                                     f"(truncation policy {policy!r})", source)
                    break
        if problem is None:
            out.append(ex)
        elif policy == "error":
            raise problem
        elif report is not None:
            report.add(source, problem)
    return out
