"""How an entry point reports a user's mistake: ONE line ``error: <message>`` on stderr and exit
status 2 instead of a traceback, for a :class:`~alignshift.config.ConfigError`, a
:class:`~alignshift.data.DataError` (naming the file/row/field), a bad JSON document or a
missing file; and the ``--skip-bad-rows`` flag every entry point takes.

Used by :mod:`alignshift.cli` (which re-exports it for the experiment scripts) and by
``python -m alignshift.dryrun`` (which :mod:`alignshift.cli` imports, so it cannot import
:mod:`alignshift.cli` back).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from alignshift.config import ConfigError

__all__ = ["user_errors", "error_line", "exit_on", "run_main", "add_skip_bad_rows"]


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors an entry point reports as one ``error:`` line (exit status 2): mistakes in the
    user's config, data files or paths, not bugs."""
    from alignshift.data.schema import DataError

    return (ConfigError, DataError, json.JSONDecodeError, FileNotFoundError, IsADirectoryError,
            NotADirectoryError)


def error_line(e: BaseException) -> str:
    """``error: <message>`` on one line (a missing file as ``<path>: <reason>``)."""
    if isinstance(e, OSError) and e.filename is not None:
        text = f"{e.filename}: {e.strerror or e}"
    else:
        text = str(e) or type(e).__name__
    return "error: " + " ".join(line.strip() for line in text.splitlines() if line.strip())


@contextlib.contextmanager
def exit_on(*errors: type[BaseException]):
    """Inside the block, an exception of a type in ``errors`` (default: :func:`user_errors`)
    is printed as one ``error: <message>`` line on stderr and the process exits with status 2."""
    try:
        yield
    except (errors or user_errors()) as e:
        print(error_line(e), file=sys.stderr)
        raise SystemExit(2) from None


def run_main(main, argv=None) -> int:
    """Run an entry point's ``main(argv)`` as a command: its exit status is the int it returns,
    else 0 when it returns something truthy (a summary) and 1 otherwise; 2 with one ``error:``
    line on a user error (:func:`exit_on`). Use as ``sys.exit(run_main(main))``."""
    with exit_on():
        result = main(argv)
    if isinstance(result, int) and not isinstance(result, bool):
        return result
    return 0 if result else 1


def add_skip_bad_rows(parser: argparse.ArgumentParser) -> None:
    """The ``--skip-bad-rows`` flag every entry point takes (= ``data.skip_bad_rows=true``)."""
    parser.add_argument("--skip-bad-rows", action="store_true",
                        help="drop malformed data rows (and over-long ones unless data.truncation=truncate), "
                             "count and report them, instead of stopping at the first (= data.skip_bad_rows=true)")
