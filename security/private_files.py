"""Files of the engine's state (the audit log, the SQLite store): they name accounts and
client addresses, so only their owner may read them, whatever the umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

PRIVATE_MODE = 0o600
# The audit log may be read by a log shipper running in the file's group (it may live
# outside the state dir, at security.audit_config.file): never by others.
SHARED_WITH_GROUP = 0o640


def private_opener(path: str, flags: int) -> int:
    """`open(..., opener=private_opener)`: a file it creates is 0600 from the start."""
    return os.open(path, flags, PRIVATE_MODE)


def make_private(path: Path, mode: int = PRIVATE_MODE) -> None:
    """Creates the file with `mode` if it is missing; takes off an existing one the bits
    `mode` does not grant (it was made by an earlier version under umask 022)."""
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, mode)
    try:
        current = stat.S_IMODE(os.fstat(fd).st_mode)
        if current & ~mode:
            os.fchmod(fd, current & mode)
    finally:
        os.close(fd)
