"""The state that names accounts and addresses is readable by its owner only (the audit log
also by its group, for a log shipper), whatever the umask (a review found audit.log and
security.db at 0644 and the state dir at 0755)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from security.audit import AuditLog
from security.store.sqlite import SqliteStore


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_a_new_audit_log_is_0640_and_its_lock_file_0600(tmp_path):
    """The audit log may be read by a log shipper in its group; others read neither."""
    with AuditLog(tmp_path) as log:
        log.record("auth.failure", "engine", "alice@192.0.2.1", {"protocol": "imap"})
    assert mode(tmp_path / "audit.log") == 0o640
    assert mode(tmp_path / "audit.log.lock") == 0o600


def test_an_existing_world_readable_audit_log_is_tightened_and_kept(tmp_path):
    with AuditLog(tmp_path) as log:
        log.record("auth.failure", "engine", "alice@192.0.2.1", {})
    os.chmod(tmp_path / "audit.log", 0o666)
    with AuditLog(tmp_path) as log:
        assert log.last_seq == 1
        assert log.verify().ok
    assert mode(tmp_path / "audit.log") == 0o640


def test_a_torn_tail_is_kept_in_a_private_file(tmp_path):
    with AuditLog(tmp_path) as log:
        log.record("auth.failure", "engine", "alice@192.0.2.1", {})
    with (tmp_path / "audit.log").open("ab") as fh:
        fh.write(b'{"seq":2,"subject":"bob@198.51.100.')
    with AuditLog(tmp_path) as log:
        assert log.last_seq == 1
    assert mode(tmp_path / "audit.log.torn") == 0o600


async def test_the_sqlite_database_and_its_wal_are_0600(tmp_path):
    path = tmp_path / "security.db"
    store = SqliteStore(path)
    await store.open()
    try:
        await store.clear_failures("a:alice")
        await store.flush()
    finally:
        await store.close()
    assert mode(path) == 0o600
    os.chmod(path, 0o644)  # as an earlier version left it
    store = SqliteStore(path)
    await store.open()
    try:
        assert mode(path) == 0o600
        wal = Path(f"{path}-wal")
        assert wal.exists() and mode(wal) == 0o600
    finally:
        await store.close()


def test_the_exporter_creates_its_state_dir_0700(tmp_path):
    from exporter.config import load_config
    from exporter.service import Exporter

    config = tmp_path / "config.yaml"
    config.write_text(f"server:\n  state_dir: {tmp_path}/new/state\n")
    exporter = Exporter(load_config(config))
    try:
        assert mode(tmp_path / "new" / "state") == 0o700
        assert mode(tmp_path / "new" / "state" / "audit.log") == 0o640
    finally:
        if exporter.audit is not None:
            exporter.audit.close()
