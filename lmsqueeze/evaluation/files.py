"""Report files written whole or not at all: a temporary file beside the target, then a rename.

The finished file gets the mode a plain open() would give under the user's umask (mkstemp makes 0600,
which left reports unreadable to colleagues), as `io.write_json_atomic` does for JSON.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lmsqueeze.io import umask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))
