"""Progress bars and console output on stderr (stdout is kept for `--json`)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")
console = Console(stderr=True)
if not console.is_terminal and "COLUMNS" not in os.environ:
    console.width = 120  # a CI log, not a terminal: rich would cut the summary table at 80 columns
_enabled = True


def set_enabled(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


def note(message: str) -> None:
    """A progress line (stage headers, what a stage wrote); silent with --quiet."""
    if _enabled:
        console.print(message, soft_wrap=True)  # one line each in a CI log, whatever the terminal width


def warn(message: str) -> None:
    """Something the user should know that does not stop the run; printed even with --quiet."""
    console.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)


def quiet_libraries() -> None:
    """Silence transformers' own progress bars and info logs: the stages report progress here."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar (a no-op wrapper when progress is disabled)."""
    if not _enabled:
        yield from items
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total if total is not None else len(items))  # type: ignore[arg-type]
        for item in items:
            yield item
            bar.advance(task)
