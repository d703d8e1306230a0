"""Writing files so that a crash, a kill or a full disk never leaves half a file where a whole one was."""

from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `target` to write to; it replaces `target` only when the block succeeds, so a
    reader sees the old file or the new one, never a mix, and a failed write leaves no temporary file behind."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        readable_by_all(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomically(target: str | os.PathLike, data: bytes | str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def readable_by_all(path) -> None:
    """Give a temp file the mode a plain `open(path, "w")` would (0666 less the umask): mkstemp and
    safetensors create files readable by their owner only, and a model card or adapter must be shareable."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def sha256_of(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in blocks (checkpoints and caches are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
