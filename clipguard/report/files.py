"""Where a report's files go and what they point at: a report never replaces a file it did not write, and a
picture a record names is found from the record's own folder, not from wherever the report happens to run."""

from __future__ import annotations

import os
from pathlib import Path

from clipguard.errors import ClipguardError

# What the first kilobyte of a file clipguard report wrote holds (older reports too): Markdown's title line, the
# HTML page's title, the CSV's leading columns. Anything else at an output path is someone else's file.
MARKS = {".md": "# clipguard report", ".html": "<title>clipguard report</title>",
         ".csv": "dataset,model,pretrained,task,acc1"}


def written_by_report(path: Path) -> bool:
    """Whether ``path`` holds a report file clipguard wrote (by the mark of its kind; unknown suffixes: any mark)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(1024)
    except OSError:
        return False
    marks = [MARKS[path.suffix.lower()]] if path.suffix.lower() in MARKS else list(MARKS.values())
    return any(m in head for m in marks)


def refuse_foreign(outputs: dict[str, Path | None], force: bool) -> None:
    """One line, before anything is written, when an output (``{"--out": path, ...}``) is an existing file that
    clipguard report did not write and ``force`` is off."""
    if force:
        return
    for flag, path in outputs.items():
        if path is not None and Path(path).is_file() and not written_by_report(Path(path)):
            raise ClipguardError(f"report: {flag} {str(path)!r} exists and was not written by clipguard report; "
                                 "choose another path or pass --force to replace it")


def resolve_picture(text: str, record_path: str | None) -> Path | None:
    """The file a record's picture path names, or None when it is gone.

    Commands record the path as it was given, often relative to the folder they ran in (a suite writes
    ``runs/bench/uap_png/...`` while its records sit in ``runs/bench/records``). That folder is usually the records'
    folder or one above it, so the path is tried against each of those in turn (nearest first); the current folder
    comes last, for records moved away from their pictures."""
    p = Path(text)
    if p.is_absolute():
        return p if p.is_file() else None
    bases = list(Path(record_path).resolve().parents) if record_path else []
    for base in [*bases, Path.cwd()]:
        if (base / p).is_file():
            return (base / p).resolve()
    return None


def link(target: Path, page: Path) -> str:
    """``target`` as a link from the report file ``page`` (relative, forward slashes), wherever either lives."""
    return Path(os.path.relpath(Path(target).resolve(), Path(page).resolve().parent)).as_posix()
