"""The command line's answers to input it cannot use: one line on stderr and exit 2."""

from __future__ import annotations

import io
import sys

import bcrypt
import pytest

from exporter import cli
from exporter.cli import main


def stdin(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def test_hash_password_hashes_a_line_of_up_to_72_bytes(monkeypatch, capsys):
    stdin(monkeypatch, b"a" * 72 + b"\n")
    assert main(["hash-password"]) == 0
    assert bcrypt.checkpw(b"a" * 72, capsys.readouterr().out.strip().encode())


@pytest.mark.parametrize(("data", "message"), [
    (b"a" * 80 + b"\n", "password longer than 72 bytes (bcrypt reads no further)\n"),
    ("\u00e9".encode() * 37 + b"\n", "password longer than 72 bytes (bcrypt reads no further)\n"),
    (b"pass\xffword\n", "the password is not UTF-8\n"),
    (b"\n", "empty password\n"),
])
def test_hash_password_refuses_what_bcrypt_cannot_take(monkeypatch, capsys, data, message):
    stdin(monkeypatch, data)
    assert main(["hash-password"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == message


@pytest.mark.parametrize(("args", "message"), [
    (["--listen", "127.0.0.1:99999"], "--listen: port 99999 is out of range: must be 1 to "
                                      "65535\n"),
    (["--listen", "nonsense"], "--listen: must be HOST:PORT (127.0.0.1:10587, [::1]:10587, "
                               "or :10587 for every address)\n"),
    (["--listen", ""], "--listen: must be HOST:PORT (127.0.0.1:10587, [::1]:10587, or "
                       ":10587 for every address)\n"),
    (["--state-dir", ""], "--state-dir: must not be empty\n"),
])
def test_run_checks_its_overrides_before_starting(monkeypatch, tmp_path, capsys, args,
                                                  message):
    """--listen was merged after the schema check: 99999 bound 34463, `nonsense` died in a
    ValueError traceback; an empty --state-dir was dropped without a word."""

    def started(state_dir):
        raise AssertionError(f"started on {state_dir}")

    monkeypatch.setattr(cli, "hold_state_dir", started)  # the first step of a start
    assert main(["run", "--state-dir", str(tmp_path / "state"), *args]) == 2
    assert capsys.readouterr().err == message


def test_generate_into_a_directory_it_cannot_write_is_one_line(tmp_path, capsys):
    """--out /proc/nope ended in a FileNotFoundError traceback, exit 1."""
    assert main(["generate", "--out", "/proc/nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("/proc/nope") and err.endswith(": cannot write: No such file or "
                                                          "directory\n")
    assert err.count("\n") == 1
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    assert main(["generate", "--out", str(not_a_dir)]) == 2
    assert capsys.readouterr().err.endswith(": cannot write: Not a directory\n")


def test_security_with_an_empty_token_file_has_no_admin_token(tmp_path, capsys):
    """An empty --token-file sent `Authorization: Bearer ` and got 401, exit 1."""
    empty = tmp_path / "token"
    empty.write_text("\n")
    # a port nothing listens on: the old code's request is refused at once
    assert main(["security", "--url", "http://127.0.0.1:9", "--token-file", str(empty),
                 "bans"]) == 2
    assert capsys.readouterr().err == f"no admin token: {empty} is empty\n"
