"""Files and folders written so that no reader ever takes a half-written one for complete: everything
goes into a temporary sibling first and is renamed into place (a rename within a folder is atomic)."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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
