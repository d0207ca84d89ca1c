"""Rich progress bars on stderr that show images per second."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from clipguard.distributed import is_main, world_size

console_err = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Items per second, labelled with the task's unit (img/s by default); ``per_item``: seconds per item over the
    whole run (few slow items finishing in bursts, e.g. suite cells, where a windowed rate swings from 0 to 1000s)."""

    def __init__(self, unit: str = "img", per_item: bool = False):
        super().__init__()
        self.unit, self.per_item = unit, per_item

    def render(self, task) -> Text:
        if self.per_item:
            each = task.elapsed / task.completed if task.completed and task.elapsed else None
            return Text(f"{each:,.1f} s/{self.unit}" if each else f"-- s/{self.unit}", style="cyan")
        speed = task.finished_speed or task.speed
        if not speed and task.elapsed:
            speed = task.completed / task.elapsed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"-- {self.unit}/s", style="cyan")


@contextmanager
def progress_bar(total: int, description: str, *, enabled: bool = True, unit: str = "img", sharded: bool = False,
                 per_item: bool = False):
    """Yield ``advance(n, **fields)``; the bar shows done/total, img/s, elapsed and extra fields.

    Under torchrun only rank 0 draws. ``sharded``: ``total`` is split over the ranks and ``advance`` counts rank 0's
    share, so the bar counts it ``world_size`` times (the ranks move at the same pace) and says so. ``per_item``:
    seconds per item instead of items per second (:class:`RateColumn`)."""
    if not enabled or not is_main():
        yield lambda n=1, **fields: None
        return
    scale = world_size() if sharded else 1
    if scale > 1:
        description = f"{description} [x{scale} ranks]"
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit, per_item),
                        TimeElapsedColumn(), TextColumn("{task.fields[extra]}"), console=console_err,
                        transient=False)
    with progress:
        task = progress.add_task(description, total=total, extra="")

        def advance(n: int = 1, **fields) -> None:
            extra = "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            progress.update(task, advance=n * scale, extra=extra)

        yield advance
