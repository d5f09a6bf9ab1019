"""Anthropic HH-RLHF (``Anthropic/hh-rlhf``).

Published schema: ``chosen`` and ``rejected``, each a full transcript
``"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: <final>"``; the two
share every turn but the final assistant response. Subsets by ``data_dir``:
``harmless-base``, ``helpful-base``, ``helpful-online``, ``helpful-rejection-sampled``
(``red-team-attempts`` has another schema and is not a preference set). Splits ``train``,
``test``.

Mapping: the shared prefix up to the last ``"\\n\\nAssistant:"`` is the prompt and the text
after it the response. ``format="chat"`` (default) parses the prompt into
``meta["prompt_messages"]`` (roles ``user``/``assistant``) with ``prompt`` = the last human
turn, for chat templates; ``format="raw"`` keeps the HH text prompt verbatim, ending in
``"\\n\\nAssistant:"`` -- the format DoRA's released code trains on
(``"\\n\\nHuman: {q}\\n\\nAssistant: "``). ``meta["subset"]`` records ``data_dir``.
"""

from __future__ import annotations

import re

from alignshift.data.schema import DataError, PreferenceExample, SkippedRows, convert_rows

from .base import load_rows, require_text

__all__ = ["HUB_NAME", "SUBSETS", "split_transcript", "parse_turns", "load_hh_rlhf"]

HUB_NAME = "Anthropic/hh-rlhf"
NAME = "hh_rlhf"
SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
_ASSISTANT = "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")


def split_transcript(text: str) -> tuple[str, str]:
    """``(prompt ending in '\\n\\nAssistant:', final response)`` of one transcript."""
    k = text.rfind(_ASSISTANT)
    if k < 0:
        raise ValueError("no '\\n\\nAssistant:' turn")
    return text[: k + len(_ASSISTANT)], text[k + len(_ASSISTANT):].strip()


def parse_turns(prompt: str) -> list[dict]:
    """HH prompt text -> ``[{"role": "user"|"assistant", "content"}]`` (the trailing empty
    assistant marker dropped)."""
    parts = _TURN.split(prompt)
    msgs = []
    for role, content in zip(parts[1::2], parts[2::2]):
        msgs.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    if msgs and msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
        msgs.pop()
    return msgs


def load_hh_rlhf(source: str = HUB_NAME, split: str = "train", *, data_dir: str | None = None,
                 format: str = "chat", max_rows: int | None = None, skip_bad_rows: bool = False,
                 report: SkippedRows | None = None) -> list[PreferenceExample]:
    """Pairs of ``split`` (module docstring); with ``skip_bad_rows`` malformed rows are dropped
    and counted in ``report``."""
    if format not in ("chat", "raw"):
        raise ValueError(f"format must be 'chat' or 'raw', got {format!r}")
    rows = load_rows(source, split, data_dir=data_dir, max_rows=max_rows, dataset=NAME)
    return convert_rows(rows, lambda r, i: _row_to_example(r, i, data_dir=data_dir, format=format),
                        source=f"{NAME}/{split}", skip_bad_rows=skip_bad_rows, report=report)


def _row_to_example(r, i: int, *, data_dir: str | None, format: str) -> PreferenceExample:
    c_text = require_text(r, "chosen", i, NAME)
    r_text = require_text(r, "rejected", i, NAME)
    try:
        pc, chosen = split_transcript(c_text)
    except ValueError:
        raise DataError(f"{NAME} row {i}: field 'chosen' has no '\\n\\nAssistant:' turn") from None
    try:
        pr, rejected = split_transcript(r_text)
    except ValueError:
        raise DataError(f"{NAME} row {i}: field 'rejected' has no '\\n\\nAssistant:' turn") from None
    if pc != pr:
        raise DataError(f"{NAME} row {i}: field 'rejected' does not share the conversation of field 'chosen'")
    if not chosen:
        raise DataError(f"{NAME} row {i}: field 'chosen' has an empty final response")
    if not rejected:
        raise DataError(f"{NAME} row {i}: field 'rejected' has an empty final response")
    if chosen == rejected:
        raise DataError(f"{NAME} row {i}: field 'rejected' is identical to field 'chosen'")
    meta = {"source": NAME, "row": i, "subset": data_dir or ""}
    if format == "raw":
        prompt = pc
        meta["raw_prompt"] = True
    else:
        msgs = parse_turns(pc)
        if not msgs or msgs[-1]["role"] != "user" or not msgs[-1]["content"]:
            raise DataError(f"{NAME} row {i}: field 'chosen' does not end with a human turn before the response")
        prompt = msgs[-1]["content"]
        if len(msgs) > 1:
            meta["prompt_messages"] = msgs
    return PreferenceExample(prompt, chosen, rejected, meta)
