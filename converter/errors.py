"""Exception families.

`UserError` is a problem with what the user asked for (a recipe, a path, a checkpoint): the CLI
prints it on one line and exits 1. `ParityFailure` means the artifact was built but is not faithful
enough to the original: exit 2. Anything else is a bug: traceback and exit 3.
"""

from __future__ import annotations

import os
from pathlib import Path


class UserError(Exception):
    """Bad input from the user: recipe, paths, checkpoint contents, command-line arguments.

    Attributes:
        details: extra fields for the `--json` error record (e.g. verify's list of problems).
    """

    exit_code = 1

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


class ParityFailure(Exception):
    """The converted model missed one or more parity thresholds.

    Attributes:
        failures: one human-readable line per missed threshold.
        report_dir: where the parity report was written for the user to read.
    """

    exit_code = 2

    def __init__(self, failures: list[str], report_dir: str):
        self.failures = failures
        self.report_dir = report_dir
        super().__init__(
            f"parity failed ({'; '.join(failures)}); nothing published, report in {report_dir}"
        )


def read_user_text(path: Path, what: str) -> str:
    """A UTF-8 text file the user named.

    Args:
        what: how the user named it ("recipe", "data file", ...), the start of any error.

    Raises:
        UserError: the path is missing or a folder, or the bytes are not UTF-8.
    """
    if not path.is_file():
        raise UserError(f"{what} {path} {'is a folder, not a file' if path.is_dir() else 'does not exist'}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def check_writable_folder(folder: Path, what: str) -> None:
    """Fail before any work when `folder` could not be created or written (its nearest existing
    ancestor is a file, or is not writable)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{what} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {folder}: {existing} is not writable")


def first_line(exc: BaseException) -> str:
    """The first line of a library's error message (its type name when it has none), for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(" :") if text else type(exc).__name__


def listed(items: list[str], sep: str = ", ", shown: int = 3) -> str:
    """"a, b, c and 4 more": the first `shown` items of a list named in a one-line error."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return sep.join(items[:shown]) + more
