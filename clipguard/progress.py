"""Rich progress bars on stderr that show images per second."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

console_err = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Items per second, labelled img/s."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed and task.elapsed:
            speed = task.completed / task.elapsed
        return Text(f"{speed:,.1f} img/s" if speed else "-- img/s", style="cyan")


@contextmanager
def progress_bar(total: int, description: str, *, enabled: bool = True):
    """Yield ``advance(n, **fields)``; the bar shows done/total, img/s, elapsed and extra fields."""
    if not enabled:
        yield lambda n=1, **fields: None
        return
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                        TimeElapsedColumn(), TextColumn("{task.fields[extra]}"), console=console_err,
                        transient=False)
    with progress:
        task = progress.add_task(description, total=total, extra="")

        def advance(n: int = 1, **fields) -> None:
            extra = "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            progress.update(task, advance=n, extra=extra)

        yield advance
