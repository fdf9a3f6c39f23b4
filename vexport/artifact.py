"""Output folders are written to a temporary sibling and renamed into place when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from vexport.errors import OutputExistsError, VexportError


def check_output(output: Path, force: bool) -> None:
    """Fail before any work if OUTPUT exists and --force was not given."""
    if output.exists() and not force:
        raise OutputExistsError(f"--output {output} already exists (pass --force to replace it)")
    if output.exists() and not output.is_dir():
        raise VexportError(f"--output {output} exists and is not a folder")


@contextlib.contextmanager
def staging_dir(output: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling of OUTPUT; rename it to OUTPUT only if the block succeeds.

    On any exception, KeyboardInterrupt included, the temporary folder is removed and OUTPUT (if it
    existed) is left untouched.
    """
    output = Path(output).absolute()
    check_output(output, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(tmp: Path, output: Path) -> None:
    if not output.exists():
        os.rename(tmp, output)
        return
    old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(output, old)
    try:
        os.rename(tmp, output)
    except BaseException:
        os.rename(old, output)
        raise
    shutil.rmtree(old, ignore_errors=True)
