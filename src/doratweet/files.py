"""Writing files so that a crash, a kill or a full disk never leaves half a file where a whole one was."""

from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import UserError


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


def check_creatable(path: str | os.PathLike, option: str) -> None:
    """Refuse in one line, before any work, an output path that cannot be made: a link to nothing, a file where a
    folder must be, a folder without write permission (or on a read-only disk)."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise UserError(f"{option} {path}: a link to {os.readlink(path)}, which does not exist; remove the link or "
                        "choose another path")
    place = path if path.exists() else path.parent
    while not place.exists() and not place.is_symlink() and place != place.parent:
        place = place.parent
    if place.is_symlink() and not place.exists():
        raise UserError(f"{option} {path}: {place} is a link to {os.readlink(place)}, which does not exist; "
                        "choose another path")
    if place.exists() and not place.is_dir():
        if place == path:
            return  # an existing file: the verb's own check says what to do with it
        raise UserError(f"{option} {path}: {place} is a file, not a folder; choose another path")
    if not os.access(place, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: cannot write in {place} (permission denied or a read-only disk); choose "
                        "another path")
