"""Preference-example schema and validation.

A preference example is a ``(prompt, chosen, rejected)`` triple of plain strings
plus a free-form ``meta`` dict (scenario bookkeeping such as topic, category and
split).  :func:`validate_example` / :func:`validate_examples` turn raw rows
(dicts or :class:`PreferenceExample`) into validated examples and raise
:class:`DataError` with a message that names the row index and the offending
field, e.g. ``row 17: field 'chosen' is empty``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

__all__ = ["DataError", "PreferenceExample", "validate_example", "validate_examples", "TEXT_FIELDS"]

#: The required text fields of a preference example, in order.
TEXT_FIELDS: tuple[str, ...] = ("prompt", "chosen", "rejected")


class DataError(ValueError):
    """A malformed data row. The message names the row index and the field."""


@dataclass(frozen=True)
class PreferenceExample:
    prompt: str
    chosen: str
    rejected: str
    meta: dict = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected, "meta": dict(self.meta)}


def _error(index: int, name: str, problem: str) -> DataError:
    return DataError(f"row {index}: field '{name}' {problem}")


def validate_example(row: Mapping[str, Any] | PreferenceExample, index: int) -> PreferenceExample:
    """Validate one row and return it as a :class:`PreferenceExample`.

    Checks, in order: each of ``prompt``/``chosen``/``rejected`` is present, is a
    ``str`` and is not empty or whitespace-only; ``chosen`` and ``rejected`` differ
    (compared after stripping surrounding whitespace); ``meta`` (optional) is a dict.
    Raises :class:`DataError` naming ``index`` and the field otherwise.
    """
    if isinstance(row, PreferenceExample):
        values: Mapping[str, Any] = row.as_dict()
    elif isinstance(row, Mapping):
        values = row
    else:
        raise DataError(f"row {index}: expected a dict or PreferenceExample, got {type(row).__name__}")

    for name in TEXT_FIELDS:
        if name not in values:
            raise _error(index, name, "is missing")
        value = values[name]
        if not isinstance(value, str):
            raise _error(index, name, f"must be a str, got {type(value).__name__}")
        if not value.strip():
            raise _error(index, name, "is empty")
    if values["chosen"].strip() == values["rejected"].strip():
        raise _error(index, "rejected", "is identical to field 'chosen'")

    meta = values.get("meta", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, Mapping):
        raise _error(index, "meta", f"must be a dict, got {type(meta).__name__}")

    if isinstance(row, PreferenceExample):
        return row
    return PreferenceExample(prompt=values["prompt"], chosen=values["chosen"], rejected=values["rejected"], meta=dict(meta))


def validate_examples(rows: Iterable[Mapping[str, Any] | PreferenceExample]) -> list[PreferenceExample]:
    """Validate every row (see :func:`validate_example`); the first bad row raises."""
    return [validate_example(row, i) for i, row in enumerate(rows)]
