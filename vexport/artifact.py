"""Output folders are written to a temporary sibling and renamed into place when complete.

Rules that keep `--force` from losing data:
- an output that is, contains or lies inside an input of the same command is refused (vexport/paths.py);
- `--force` replaces only a vexport artifact (a folder with a readable manifest.json) or an empty folder;
- one writer per output: an exclusive lock on the sibling `.NAME.lock` (a second writer fails at once);
- the temporary sibling `.NAME.partial-*` holds an owner marker (pid and host); a later run to the same
  output removes partials whose owner process is gone, never one whose owner is alive;
- an OSError while the folder is written (a full disk, a read-only parent) is one VexportError naming the
  output and the reason, with the partial folder removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from vexport.errors import OutputExistsError, VexportError
from vexport.paths import refuse_overlap

log = logging.getLogger(__name__)

OWNER_FILE = ".vexport-owner.json"  # in a partial folder: who writes it; removed before the rename
MANIFEST_FILE = "manifest.json"


class OutputLockedError(VexportError):
    """Another vexport process is writing the same output folder."""


def check_output(output: str | os.PathLike, force: bool, inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Fail before any work if OUTPUT cannot or must not be (re)placed.

    OUTPUT must not be, contain or lie inside any of INPUTS; an existing OUTPUT needs `force` and must be a
    vexport artifact or an empty folder; the nearest existing parent must be a writable folder.
    """
    output = Path(output)
    refuse_overlap(output, inputs)
    if output.exists() or output.is_symlink():
        if not force:
            raise OutputExistsError(f"--output {output} already exists (pass --force to replace it)")
        if not output.is_dir():
            raise VexportError(f"--output {output} exists and is not a folder")
        if not _replaceable(output):
            raise VexportError(f"--output {output} is not a vexport artifact (no readable {MANIFEST_FILE}) and "
                               "not empty; move it away or choose another --output")
    _check_parent(output)


def _replaceable(folder: Path) -> bool:
    """An empty folder, or one whose manifest.json is a JSON object naming a manifest_version and format."""
    try:
        if not any(folder.iterdir()):
            return True
        data = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and isinstance(data.get("manifest_version"), int) and \
        isinstance(data.get("format"), str)


def _check_parent(output: Path) -> None:
    """The nearest existing ancestor of OUTPUT must be a folder this process can write to."""
    ancestor = output.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise VexportError(f"--output {output}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise VexportError(f"--output {output}: {ancestor} is not writable")


@contextlib.contextmanager
def staging_dir(output: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling of OUTPUT; rename it to OUTPUT only if the block succeeds.

    Holds OUTPUT's lock throughout. On any exception, KeyboardInterrupt included, the temporary folder is
    removed and OUTPUT (if it existed) is left untouched; an OSError becomes a VexportError naming OUTPUT.
    """
    output = Path(output).absolute()
    check_output(output, force)
    with _made_parents(output), output_lock(output):
        remove_stale(output)
        check_output(output, force)  # again under the lock: another writer may have finished meanwhile
        tmp = output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            _write_owner(tmp)
            yield tmp
            _replace(tmp, output)
            with contextlib.suppress(OSError):  # after the rename, so that a partial always names its owner
                (output / OWNER_FILE).unlink()
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise VexportError(f"--output {output}: cannot write it ({_reason(exc)}); nothing was left behind") \
                from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextlib.contextmanager
def _made_parents(output: Path) -> Iterator[None]:
    """Create OUTPUT's missing parent folders; remove those left empty if the block fails."""
    missing = []
    parent = output.parent
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    try:
        for folder in reversed(missing):
            folder.mkdir()
    except OSError as exc:
        _remove_empty(missing)
        raise VexportError(f"--output {output}: cannot create {folder} ({_reason(exc)})") from None
    try:
        yield
    except BaseException:
        _remove_empty(missing)
        raise


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold an exclusive lock on `.NAME.lock` beside OUTPUT; fail at once if another process holds it.

    The lock file holds the holder's pid and is removed on release. A process that opened the file before it
    was removed finds that the path now names another file (or none), and locks again.
    """
    path = output.parent / f".{output.name}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise VexportError(f"--output {output}: cannot create its lock file {path} ({_reason(exc)})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise OutputLockedError(f"--output {output} is being written by another vexport (pid {holder}); "
                                    "wait for it to finish or choose another --output") from None
        if _same_file(fd, path):
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still locked, so no other process locks this file after us
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _write_owner(partial: Path) -> None:
    (partial / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")


def remove_stale(output: Path) -> list[Path]:
    """Remove `.NAME.partial-*` siblings whose owner process (on this host) is gone; call under the lock.

    A partial with a live owner, an owner on another host or no readable marker is kept (its owner cannot
    be proven gone). A `.NAME.old-*` sibling (the previous OUTPUT of a replace that was cut short) is removed
    when OUTPUT exists; when it does not, it is kept, with a warning naming it. Returns what was removed.
    """
    removed = []
    prefix = glob.escape(f".{output.name}")
    for partial in sorted(output.parent.glob(f"{prefix}.partial-*")):
        owner = _read_owner(partial)
        if owner is None:
            log.warning("keeping %s: it has no readable owner marker (%s)", partial, OWNER_FILE)
        elif owner["host"] == socket.gethostname() and not _alive(owner["pid"]):
            log.info("removing %s, left by a vexport process (pid %d) that is gone", partial, owner["pid"])
            shutil.rmtree(partial, ignore_errors=True)
            removed.append(partial)
    for old in sorted(output.parent.glob(f"{prefix}.old-*")):
        if output.exists() or output.is_symlink():
            _remove_tree(old)
            removed.append(old)
        else:
            log.warning("keeping %s: the previous %s, left by a replace that was cut short", old, output)
    return removed


def _read_owner(partial: Path) -> dict | None:
    try:
        owner = json.loads((partial / OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    ok = isinstance(owner, dict) and isinstance(owner.get("pid"), int) and isinstance(owner.get("host"), str)
    return owner if ok else None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def _remove_tree(path: Path) -> None:
    if path.is_symlink():
        with contextlib.suppress(OSError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _reason(exc: OSError) -> str:
    return exc.strerror or " ".join(str(exc).split())


def _replace(tmp: Path, output: Path) -> None:
    if not (output.exists() or output.is_symlink()):
        os.rename(tmp, output)
        return
    old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(output, old)
    try:
        os.rename(tmp, output)
    except BaseException:
        os.rename(old, output)
        raise
    _remove_tree(old)
