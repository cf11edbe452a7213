"""Files and folders written so that no reader ever takes a half-written one for complete: everything
goes into a temporary sibling first and is renamed into place (a rename within a folder is atomic).

Every command that writes a user-named output (`generate --out`, `merge --out`, `prepare-model --out`,
`train`/`submit`'s train.output_dir and data.cache_dir) checks it here first (`check_output`), before a
weight is read: an answer file or a merged model that cannot be written is an error in the first second,
not after the work."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from qlora_dist.errors import ConfigError


def output_problems(path: Path | str, option: str, folder: bool = False, empty: bool = False) -> list[str]:
    """Why `path` cannot be written as an output named by `option` ([] when it can): a file output must
    not be a folder, a folder output not a file (nor, with empty=True, a folder holding anything); the
    nearest existing folder on the way must be a writable folder (missing parents are created)."""
    path = Path(path).expanduser()
    what = "folder" if folder else "file"
    if path.is_dir() and not folder:
        return [f"{option}: {path} is a folder; give the path of the {what} to write"]
    if path.exists() and not path.is_dir() and folder:
        return [f"{option}: {path} is a file, not a folder"]
    if folder and empty and path.is_dir() and any(path.iterdir()):
        return [f"{option}: {path} exists and is not empty; refusing to overwrite it (remove it or choose another)"]
    existing = next(p for p in [path if folder else path.parent, *path.parents] if p.exists())
    if not existing.is_dir():
        return [f"{option}: {existing} (on the way to {path}) is a file, not a folder"]
    # os.access asks the kernel: a read-only mount says no even to root (who may write anywhere else).
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"{option}: {existing} is not writable" + (f" (needed to write {path})" if existing != path else "")]
    return []


def check_output(path: Path | str, option: str, folder: bool = False, empty: bool = False) -> None:
    """output_problems as a ConfigError (exit 2, one line naming the option and the path)."""
    if problems := output_problems(path, option, folder, empty):
        raise ConfigError(problems)


def write_text(path: Path, text: str) -> None:
    """`text` into `path` via a hidden sibling; on any failure the sibling is removed (nothing hidden
    stays behind) and the OSError propagates."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def folder(final: Path, replace: bool = False) -> Iterator[Path]:
    """An empty temporary folder to fill; renamed to `final` when the block ends without an error, removed
    when it raises. An existing `final` is replaced if it is empty, or always with replace=True."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if final.is_dir() and (replace or not any(final.iterdir())):
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def append_lines(path: Path, lines: list[str]) -> None:
    """Whole lines appended to `path` with one write (O_APPEND) and flushed to disk, so that a kill leaves
    at most the last line cut short, which a reader of the file drops (see cut_partial_line)."""
    data = "".join(line.rstrip("\n") + "\n" for line in lines).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:  # a regular file takes it in one write; a signal may split it
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def cut_partial_line(path: Path) -> bool:
    """Drop a last line without its newline (a write a kill interrupted); True if one was dropped."""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    with open(path, "r+b") as f:
        f.truncate(data.rfind(b"\n") + 1)
    return True
