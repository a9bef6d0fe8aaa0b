"""Atomic writes: a file, or a whole folder, is written under a temporary name next to its target,
flushed to disk, then renamed into place, so a reader (or a crash) never sees half of it."""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ..errors import LoraError


def write_atomically(target: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """write(temporary path) next to `target`, then rename it over `target`; on any error the
    target is as it was and no temporary file is left."""
    target = Path(target)
    tmp = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        write(tmp)
        _settle(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def write_text_atomically(target: str | os.PathLike, text: str) -> Path:
    return write_atomically(target, lambda tmp: tmp.write_text(text))


def check_out_folder(out: str | os.PathLike, force: bool) -> Path:
    """`out` as a Path, if a result may be written there: absent, empty, or replaced (force=True)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LoraError(f"out={str(out)!r} is a file; give a folder to write to")
    if out.exists() and any(out.iterdir()) and not force:
        raise LoraError(f"out={str(out)!r} already holds files; choose a new folder, or pass force=True to replace it")
    return out


def write_folder_atomically(target: str | os.PathLike, write: Callable[[Path], object], force: bool = False) -> Path:
    """write(temporary folder) beside `target`, then rename it to `target`: the folder appears whole
    or not at all. On any error `target` is as it was and no temporary folder is left. A `target`
    that already holds files is replaced only with force=True."""
    target = check_out_folder(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        for path in tmp.rglob("*"):
            if path.is_file():
                _settle(path)
            else:
                os.chmod(path, 0o777 & ~_umask())
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only; the result is an ordinary folder
        _replace_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _settle(file: Path) -> None:
    """The usual permissions (some writers, safetensors and mkdtemp among them, make files 0600) and
    the bytes on disk, before the rename that publishes the file."""
    os.chmod(file, 0o666 & ~_umask())
    with open(file, "rb") as f:
        os.fsync(f.fileno())


def _replace_folder(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing `target` is moved aside first and deleted after."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, old / target.name)
    try:
        os.replace(new, target)
    except BaseException:
        if old is not None:  # put the old folder back
            os.replace(old / target.name, target)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
