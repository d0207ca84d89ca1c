"""Atomic file writes: write a temp file in the target folder, then ``os.replace`` it into place."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """Where clipguard keeps what it computes once: ``$CLIPGUARD_CACHE``, else ``~/.cache/clipguard``."""
    return Path(os.environ.get("CLIPGUARD_CACHE") or Path.home() / ".cache" / "clipguard")


def _new_temp(path: Path) -> str:
    """A fresh temp file beside ``path``, created with mode 0666 so the OS applies the process umask (the
    usual permissions of a new file; mkstemp's 0600 would need the umask read back, which is racy)."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return str(tmp)
        except FileExistsError:
            continue


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically (readers never see half)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_toml(path: str | os.PathLike, what: str, hint: str = "") -> dict:
    """Parse a TOML file; a missing or invalid file is a one-line ClipguardError naming ``what``."""
    import tomllib

    from clipguard.errors import ClipguardError

    p = Path(path)
    if not p.is_file():
        raise ClipguardError(f"{what} {str(p)!r}: no such file{hint}")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ClipguardError(f"{what} {str(p)!r} is not valid TOML ({e})") from None


def check_writable(path: str | os.PathLike | None, option: str, *, directory: bool = False) -> None:
    """Fail now, before any compute, when ``path`` cannot be written: a one-line ClipguardError naming ``option``.

    The nearest existing ancestor must be a writable directory (missing folders are created later); a file
    path must not be an existing directory, a ``directory`` path must not be an existing file.
    """
    from clipguard.errors import ClipguardError

    if path is None:
        return
    p = Path(path)
    if p.exists() and p.is_dir() != directory:
        kind = "a directory" if p.is_dir() else "a file"
        raise ClipguardError(f"{option} {str(p)!r} is {kind}: give a {'folder' if directory else 'file'} path")
    base = p if directory and p.exists() else p.parent  # an existing file is replaced: its folder must be writable
    while not base.exists():
        base = base.parent
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise ClipguardError(f"{option} {str(p)!r} cannot be written ({str(base)!r} is not a writable folder)")
