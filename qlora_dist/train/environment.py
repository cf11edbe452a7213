"""What a checkpoint was made with: library versions, the package's git commit, host, CPU and GPU names.
Saved as environment.json in every checkpoint; a resume on other software or hardware logs what changed
(not an error: a newer library or another GPU type is a normal requeue)."""
from __future__ import annotations

import json
import platform
import socket
from importlib import metadata
from pathlib import Path

FILE = "environment.json"
LIBRARIES = ("torch", "deepspeed", "transformers", "peft", "bitsandbytes", "safetensors", "accelerate")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_commit(checkout: Path = Path(__file__).resolve().parents[2]) -> str | None:
    """The commit of the checkout this package runs from (the folder above qlora_dist/), read from .git
    without running git; None when installed from a wheel."""
    git = checkout / ".git"
    if not git.is_dir():
        return None
    head = (git / "HEAD").read_text().strip()
    if not head.startswith("ref: "):
        return head  # a detached HEAD holds the commit itself
    ref = head[5:]
    if (git / ref).is_file():
        return (git / ref).read_text().strip()
    packed = git / "packed-refs"
    lines = packed.read_text().splitlines() if packed.is_file() else []
    return next((line.split()[0] for line in lines if line.endswith(" " + ref)), None)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict:
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"python": platform.python_version(), **{lib: _version(lib) for lib in LIBRARIES},
            "git_commit": git_commit(), "hostname": socket.gethostname(), "cpu": _cpu_name(), "gpus": gpus}


def changes(saved_file: Path) -> str:
    """'key: then -> now; ...' between a checkpoint's environment.json and this process ('' if none or
    unknown). The hostname is left out: a requeue usually lands on another node."""
    try:
        saved = json.loads(saved_file.read_text())
    except (OSError, ValueError):
        return ""
    now = describe()
    return "; ".join(f"{k}: {saved.get(k)} -> {now[k]}" for k in now
                     if k != "hostname" and k in saved and saved[k] != now[k])
