"""A progress bar for long runs (rich), shown only on a terminal: silent when piped, with ``--quiet`` or
``--json``.

>>> with step_progress(total=3, enabled=False) as advance:
...     advance("start web")
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

__all__ = ["step_progress"]


@contextlib.contextmanager
def step_progress(total: int, *, enabled: bool = True, console: Console | None = None,
                  label: str = "scenario") -> Iterator[Callable[[str], None]]:
    """Yields ``advance(description)``: call it as each step begins. The bar goes away at the end.

    ``enabled`` False, or a console that is not a terminal, gives a no-op."""
    console = console or Console(stderr=True)
    if not enabled or not console.is_terminal or total <= 0:
        yield lambda description: None
        return
    progress = Progress(SpinnerColumn(), TextColumn(f"[bold]{label}[/]"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True)
    with progress:
        task = progress.add_task("", total=total)
        started = [False]

        def advance(description: str) -> None:
            if started[0]:
                progress.advance(task)
            started[0] = True
            progress.update(task, description=description)
        yield advance
        progress.update(task, completed=total)
