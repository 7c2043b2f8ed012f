"""Files of the engine's state (the audit log, the SQLite store): they name accounts and
client addresses, so only their owner may read them, whatever the umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

PRIVATE_MODE = 0o600


def private_opener(path: str, flags: int) -> int:
    """`open(..., opener=private_opener)`: a file it creates is 0600 from the start."""
    return os.open(path, flags, PRIVATE_MODE)


def make_private(path: Path) -> None:
    """Creates the file 0600 if it is missing; takes group and other bits off an existing
    one (made by an earlier version under umask 022)."""
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, PRIVATE_MODE)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o077:
            os.fchmod(fd, mode & 0o700)
    finally:
        os.close(fd)
