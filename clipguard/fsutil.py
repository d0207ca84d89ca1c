"""Files: atomic writes (a temp file beside the target, then ``os.replace``), output paths checked before a run,
and write failures after the work turned into one line that does not lose the run's record.

Temp files are named ``.<name>.<pid>-<owner>.<hex>.tmp`` (owner: this host and pid namespace, 6 hex digits).
A writer killed mid-write (kill -9, a dead node) leaves its temp behind; the next write of the same target, and a
fine-tuning resume, remove it when it is stale: its writer's pid is dead on this host and namespace, or (another
host on a shared disk, another container, or an older name without a pid) it is older than ``STALE_AFTER_S``.
A fresh temp of a live concurrent writer is never touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from clipguard.errors import ClipguardError

STALE_AFTER_S = 3600  # a temp untouched this long has no live writer (a writer's writes keep its mtime fresh)
_TEMP = re.compile(r"(?:(?P<pid>\d+)-(?P<owner>[0-9a-f]{6})\.)?[0-9a-f]{12}\.tmp")  # after ".<name>."


def cache_root() -> Path:
    """Where clipguard keeps what it computes once: ``$CLIPGUARD_CACHE``, else ``~/.cache/clipguard``."""
    return Path(os.environ.get("CLIPGUARD_CACHE") or Path.home() / ".cache" / "clipguard")


@cache
def _owner() -> str:
    """This host and pid namespace: a pid names a process only there (another container sharing the hostname and
    the disk has its own pids)."""
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux: the host alone
        ns = ""
    return hashlib.sha256(f"{socket.gethostname()}|{ns}".encode()).hexdigest()[:6]


def _new_temp(path: Path) -> str:
    """A fresh temp file beside ``path``, created with mode 0666 so the OS applies the process umask (the
    usual permissions of a new file; mkstemp's 0600 would need the umask read back, which is racy)."""
    while True:
        tmp = path.parent / f".{path.name}.{os.getpid()}-{_owner()}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return str(tmp)
        except FileExistsError:
            continue


def _pid_dead(pid: int) -> bool:
    if os.name != "posix" or pid == os.getpid():  # Windows' os.kill would terminate the process
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by another user
        return False
    return False


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temp files killed writers of ``path`` left beside it (see the module docstring); returns them."""
    path, removed = Path(path), []
    prefix = f".{path.name}."
    try:
        entries = list(os.scandir(path.parent))
    except OSError:  # no folder yet: nothing to clean
        return removed
    for e in entries:
        m = _TEMP.fullmatch(e.name[len(prefix):]) if e.name.startswith(prefix) else None
        if m is None:
            continue
        try:
            stale = (m["pid"] is not None and m["owner"] == _owner() and _pid_dead(int(m["pid"]))) \
                or time.time() - e.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
            if stale:
                os.unlink(e.path)
                removed.append(Path(e.path))
        except OSError:  # gone already (another cleaner), or not ours to remove
            continue
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically (readers never see half).

    The file gets the mode a new file gets under the umask (0644 under umask 022), whatever ``write`` did:
    safetensors writes its own temp file (mode 0600) and renames it onto ``tmp_path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = _new_temp(path)
    try:
        mode = os.stat(tmp).st_mode & 0o777  # 0666 less the umask, as the OS applied it
        write(tmp)
        if os.stat(tmp).st_mode & 0o777 != mode:
            os.chmod(tmp, mode)
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
    p = Path(path)
    if not p.is_file():
        raise ClipguardError(f"{what} {str(p)!r}: no such file{hint}")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ClipguardError(f"{what} {str(p)!r} is not valid TOML ({e})") from None


def check_writable(path: str | os.PathLike | None, option: str, *, directory: bool = False) -> list[Path]:
    """Fail now, before any compute, when ``path`` cannot be written: a one-line ClipguardError naming ``option``.

    Missing folders are created (the run would create them anyway) and a probe file is created and removed where
    the output will go: permission bits decide nothing for root (``os.access`` is always true), and a read-only
    mount, a full quota or /proc only show when a file is made. A file path must not be an existing directory,
    a ``directory`` path not an existing file. Returns the folders it created. A refusal leaves no folder behind:
    neither its own nor, inside a command (:func:`holding_write_failures`), those of the command's earlier checks.
    The path is remembered as ``option``'s, so a later write failure there names the option.
    """
    if path is None:
        return []
    p = Path(path)
    try:
        made = _probe(p, option, directory)
    except ClipguardError:
        if _held is not None:
            remove_folders(_made)
        raise
    if _held is not None:
        _made[:0] = made  # deepest first: a later option's folders may lie inside an earlier one's
    _declared[os.path.abspath(p)] = option
    return made


def _probe(p: Path, option: str, directory: bool) -> list[Path]:
    if p.exists() and p.is_dir() != directory:
        kind = "a directory" if p.is_dir() else "a file"
        raise ClipguardError(f"{option} {str(p)!r} is {kind}: give a {'folder' if directory else 'file'} path")
    folder, made = (p if directory else p.parent), []
    base = folder
    while not base.exists() and base != base.parent:
        made.append(base)  # deepest first: the order to remove them in
        base = base.parent
    if not base.is_dir():
        raise ClipguardError(f"{option} {str(p)!r} cannot be written ({str(base)!r} is a file, not a folder)")
    step = f"cannot create folder {str(folder)!r}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        step = f"cannot create a file in {str(folder)!r}"
        os.unlink(_new_temp(folder / (".clipguard-probe" if directory else p.name)))
    except OSError as e:
        remove_folders(made)  # parents made before the failure go too
        raise ClipguardError(f"{option} {str(p)!r} cannot be written ({step}: {e.strerror}): give a path in a "
                             "writable folder") from None
    return made


def remove_folders(folders: list[Path]) -> None:
    """Remove the folders :func:`check_writable` made (listed deepest first) that are still empty."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:  # not empty (or gone): leave it
            continue


# ---------------------------------------------------------------- write failures after the work

# Inside a CLI command (holding_write_failures, entered by cli.app.run), a product of the run that nothing reads
# back (adversarial set, predictions) and that fails to be written to a checked path is held, not raised: the run
# finishes, and cli.output.emit writes the record first, then reports the held line (exit 2). Outside a command (the
# Python API, a bench worker) every failure raises at once, so none can pass unseen.
_declared: dict[str, str] = {}  # absolute path -> the option check_writable saw it under
_held: list[str] | None = None  # None: not inside a command
_made: list[Path] = []  # folders the command's checks made, deepest first


@contextmanager
def holding_write_failures() -> Iterator[None]:
    """Run one command: failures held by :func:`writing_output` that nobody reported (no record was emitted) end
    it with their line instead of a silent exit 0."""
    global _held
    outer, _held = _held, []
    _made.clear()
    try:
        yield
    except SystemExit as e:  # Typer's standalone mode ends every command with SystemExit
        if _held and e.code in (0, None):
            raise ClipguardError("; ".join(_held)) from None
        raise
    else:
        if _held:
            raise ClipguardError("; ".join(_held))
    finally:
        _held = outer
        _made.clear()


def take_held_failures() -> list[str]:
    """The lines held so far in this command (now the caller's to report)."""
    lines = list(_held or [])
    if _held:
        _held.clear()
    return lines


def os_error(e: BaseException | None) -> OSError | None:
    """The I/O failure behind ``e``: an OSError, a Rust io::Error in the message (safetensors: '... (os error
    28)'), or one torch wrapped (torch.save into a file object raises RuntimeError during the file's OSError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        m = re.search(r"\(os error (\d+)\)", str(e))
        if m:
            return OSError(int(m[1]), os.strerror(int(m[1])))
        if not isinstance(e, RuntimeError):  # any other error met while handling an OSError is not about I/O
            return None
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def describe_os_error(e: OSError) -> str:
    """``No space left on device``, with the file it names unless that is one of our temp files."""
    name = os.fsdecode(e.filename) if e.filename is not None else ""
    temp = name.endswith(".tmp") and os.path.basename(name).startswith(".")
    return f"{e.strerror or e}: {name!r}" if name and not temp else str(e.strerror or e)


def _option_for(path: Path) -> str | None:
    key = os.path.abspath(path)
    for declared, option in _declared.items():
        if key == declared or key.startswith(declared + os.sep):  # a file inside a declared folder (--run-dir)
            return option
    return None


@contextmanager
def writing_output(path: str | os.PathLike, what: str, *, hold: bool = False) -> Iterator[None]:
    """Write ``what`` ("the adversarial set") to ``path`` inside this block: an I/O failure (disk full, a folder
    replaced by a file, a read-only mount) becomes one line naming the option, the path and the reason.

    ``hold=True`` for a product nothing reads back later in the run: when the command declared ``path``, the line
    is held (see :func:`take_held_failures`) and the block's failure swallowed, so the record is still written.
    Other errors pass through unchanged.
    """
    try:
        yield
    except Exception as e:
        err = os_error(e)
        if err is None:
            raise
        option = _option_for(Path(path))
        where = f"{option} {str(path)!r}" if option else repr(str(path))
        line = f"{where}: {what} could not be written ({describe_os_error(err)}); make room or give another path"
        if hold and option and _held is not None:
            _held.append(line)
            return
        raise ClipguardError(line) from None


def save_fallback(text: str, kind: str, suffix: str = ".json") -> Path | None:
    """Write ``text`` to ``clipguard-<kind>-<UTC time>-<pid><suffix>`` in the current folder, else in the system
    temp folder (a full or removed output disk is often not the one these live on); None when neither works."""
    stem = f"clipguard-{kind}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}"
    for folder in (os.getcwd, tempfile.gettempdir):
        try:
            base = Path(folder())
            n = 1
            while (path := base / f"{stem}{'' if n == 1 else f'-{n}'}{suffix}").exists():
                n += 1  # never over an earlier fallback of this process
            return atomic_write_text(path, text).absolute()
        except OSError:  # os.getcwd of a removed folder raises too
            continue
    return None
