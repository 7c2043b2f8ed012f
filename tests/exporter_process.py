"""Runs the real exporter as a child process, as an operator would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.integration.components import free_port

ROOT = Path(__file__).resolve().parents[1]


class ExporterProcess:
    def __init__(self, workdir: Path, config: Path | None = None, port: int | None = None,
                 scheme: str = "http", command: list[str] | None = None,
                 state_dir: Path | None = None, env: dict[str, str] | None = None,
                 user: int | None = None, cwd: Path = ROOT):
        """``command`` replaces ``python -m exporter`` (e.g. an installed entry point);
        ``user`` runs the child under that UID (and GID), as a container's USER would."""
        self.workdir = workdir
        self.config = config
        self.port = port or free_port()
        self.scheme = scheme
        self.command = command or [sys.executable, "-m", "exporter"]
        self.env = env if env is not None else {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.user = user
        self.cwd = cwd
        self.state_dir = state_dir or workdir / "state"
        self.log_path = workdir / "exporter.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> ExporterProcess:
        cmd = [*self.command, "run", "--listen", self.address, "--state-dir", str(self.state_dir)]
        if self.config:
            cmd += ["--config", str(self.config)]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=self.cwd, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=self.env,
                                     user=self.user, group=self.user)
        if wait:
            self.wait_live()
        return self

    def wait_live(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"exporter exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/livez", timeout=1, verify=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"exporter not live after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        code = self.proc.returncode
        self.proc = None
        return code
