"""What makes a checkpoint trustworthy: a manifest of its files, and a scan for non-finite values.

manifest.json lists {relative path: {bytes, sha256}} of every other file of a checkpoint. It is written
last, after progress.json and just before the folder's rename, and so covers progress.json too: a garbage
or edited progress record is caught like any damaged file. (progress.json stays the marker that
RunPaths.checkpoints looks for; the rename is what makes a checkpoint appear, so nothing half-written is
ever listed.) A checkpoint without a manifest was written before manifests existed: it is used as is.

Verification: `damage(ckpt, deep=False)` compares sizes only (cheap: the preflight and pruning use it);
`deep=True` also compares sha256 (recover does it for the checkpoint it resumes from, and older ones
only while it has to fall back; `qlora-dist verify` does it for all). Hashing streams each file with a
large buffer, several files at once in threads (hashlib releases the GIL), so a multi-GB LoRA state
costs about its read time.

`nonfinite(ckpt)` names the first NaN/Inf tensor in the files we and DeepSpeed wrote (adapter, LoRA
weights, fp32 masters, optimizer moments): such a checkpoint is never resumed from.
"""
from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from qlora_dist import atomic

MANIFEST = "manifest.json"
HASH_BUFFER = 8 * 2**20
HASH_THREADS = 4


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb", buffering=0) as f:
        while chunk := f.read(HASH_BUFFER):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _hash_all(folder: Path, files: list[str]) -> dict[str, str]:
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        return dict(zip(files, pool.map(lambda rel: sha256_file(folder / rel), files)))


def write(folder: Path) -> int:
    """Write folder/manifest.json over every other file in it; returns the bytes it covers."""
    files = [p.relative_to(folder).as_posix() for p in _files(folder)]
    digests = _hash_all(folder, files)
    entries = {rel: {"bytes": (folder / rel).stat().st_size, "sha256": digests[rel]} for rel in files}
    atomic.write_text(folder / MANIFEST, json.dumps({"version": 1, "files": entries}, indent=1))
    return sum(e["bytes"] for e in entries.values())


def read(folder: Path) -> dict[str, dict] | None:
    """{relative path: {bytes, sha256}}; None when the folder has no manifest. Raises ValueError when
    the manifest itself is damaged."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
        if not all(isinstance(e["bytes"], int) and isinstance(e["sha256"], str) for e in files.values()):
            raise TypeError
        return files
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise ValueError(f"{MANIFEST}: not a valid manifest (damaged)") from None


def damage(folder: Path, deep: bool, only: str = "") -> str | None:
    """What is wrong with `folder` against its manifest, as "file: why"; None when it verifies (or has
    no manifest). `only`: check just the entries under this prefix (e.g. "adapter_model/")."""
    try:
        entries = read(folder)
    except ValueError as exc:
        return str(exc)
    if entries is None:
        return None
    entries = {rel: e for rel, e in entries.items() if rel.startswith(only)}
    for rel, e in entries.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel}: missing"
        size = path.stat().st_size
        if size != e["bytes"]:
            return f"{rel}: {size:,} bytes, the manifest says {e['bytes']:,} (truncated or overwritten)"
    if deep:
        digests = _hash_all(folder, list(entries))
        bad = next((rel for rel, e in entries.items() if digests[rel] != e["sha256"]), None)
        if bad:
            return f"{bad}: content differs from the manifest (sha256)"
    return None


def matches(copy: Path, folder: Path, prefix: str) -> str | None:
    """Whether `copy` holds exactly the files under `prefix` of `folder`'s manifest (the final adapter is
    a copy of a checkpoint's adapter_model/): None if so, else "file: why"."""
    try:
        entries = read(folder) or {}
    except ValueError as exc:
        return f"{folder.name}/{exc}"
    for rel, e in entries.items():
        if rel.startswith(prefix):
            path = copy / rel[len(prefix):]
            if not path.is_file() or path.stat().st_size != e["bytes"] or sha256_file(path) != e["sha256"]:
                return f"{path}: differs from {folder.name}/{rel}"
    return None


# --------------------------------------------------------------------------------------- finiteness
def first_nonfinite(tensors, where: str) -> str | None:
    """'where:key' of the first floating tensor with a NaN or Inf in a nested dict/list of tensors."""
    stack = [(where, tensors)]
    while stack:
        name, obj = stack.pop()
        if isinstance(obj, dict):
            stack += [(f"{name}.{k}" if name != where else f"{name}:{k}", v) for k, v in obj.items()]
        elif isinstance(obj, (list, tuple)):
            stack += [(f"{name}[{i}]", v) for i, v in enumerate(obj)]
        elif torch.is_tensor(obj) and obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            return name
    return None


def nonfinite(folder: Path) -> str | None:
    """Why a checkpoint's tensors cannot be trusted: the first non-finite one (adapter, LoRA weights,
    fp32 masters, optimizer states) as "file:key: ...", or a file that cannot be read without running
    code; None when all are finite. Read with safetensors and torch.load(weights_only=True) only."""
    from safetensors.torch import load_file

    from qlora_dist import compat

    files = sorted(folder.glob("adapter_model/*.safetensors")) + sorted((folder / "engine").glob("*.pt"))
    for path in files:
        rel = path.relative_to(folder).as_posix()
        try:
            state = load_file(str(path)) if path.suffix == ".safetensors" else \
                compat.safe_torch_load(path, mmap=_is_zip(path))
        except Exception as exc:  # damaged, or a pickle that wants to run code: never loaded
            return f"{rel}: unreadable as plain tensors ({reason(exc)})"
        if found := first_nonfinite(state, rel):
            return f"{found}: {NONFINITE}"
    return None


NONFINITE = "NaN or Inf values"


def reason(exc: Exception) -> str:
    """The telling line of a load error (torch's weights_only refusal names the global it refused)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    return next((line for line in lines if "Unsupported global" in line), lines[0])[:300]


def _is_zip(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(2) == b"PK"  # torch's zip format can be memory-mapped: pages are read as scanned
