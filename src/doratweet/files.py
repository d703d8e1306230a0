"""File permissions for what we write atomically."""

import os


def readable_by_all(path) -> None:
    """Give a temp file the mode a plain `open(path, "w")` would (0666 less the umask): mkstemp and
    safetensors create files readable by their owner only, and a model card or adapter must be shareable."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
