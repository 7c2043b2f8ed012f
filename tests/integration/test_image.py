"""The container image recipe, proven without a Docker engine.

The test reads the Dockerfile, lays out its build context from the build
stage's COPY lines, runs the build stage's RUN lines (scripts/image-venv.sh)
with the paths mapped into a fresh directory, and starts the final stage's
ENTRYPOINT + CMD from the resulting venv the way the image would: as the
Dockerfile's non-root USER (when the tests run as root), with the final stage's
ENV, the state dir elsewhere and nothing else writable. So the Dockerfile and
this test cannot drift apart: change one line and the other follows or fails.

The wheel and venv are built once per session (about 20 s).
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.exporter_process import ROOT, ExporterProcess
from tests.integration.components import _missing

pytestmark = pytest.mark.image

DOCKERFILE = ROOT / "Dockerfile"


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]

    def one(self, keyword: str) -> str:
        found = self.all(keyword)
        assert len(found) == 1, f"stage {self.name}: expected one {keyword}, found {found}"
        return found[0]


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages with their (KEYWORD, argument) instructions; continuations joined,
    comments dropped, global ARG defaults substituted into FROM."""
    logical, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1].strip() + " "
            continue
        logical.append(current + line)
        current = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, arg = line.partition(" ")
        keyword, arg = keyword.upper(), arg.strip()
        if keyword == "ARG" and not stages:
            key, _, default = arg.partition("=")
            args[key] = default
        elif keyword == "FROM":
            base, _, name = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], arg).partition(
                " AS ")
            stages.append(Stage(base.strip(), name.strip() or str(len(stages))))
        else:
            stages[-1].instructions.append((keyword, arg))
    return stages


def exec_form(arg: str) -> list[str]:
    import json

    value = json.loads(arg)
    assert isinstance(value, list), f"not exec form: {arg}"
    return value


@pytest.fixture(scope="session")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


def _uid(stage: Stage) -> int:
    return int(stage.one("USER").split(":")[0])


def test_dockerfile_recipe(stages: list[Stage]) -> None:
    """Multi-stage on slim Python 3.11; the final stage: non-root numeric USER, only the
    venv copied in, no build tools installed, STOPSIGNAL SIGTERM, EXPOSE matching the
    CMD's listener, the state dir a VOLUME, no HEALTHCHECK, entrypoint `run`."""
    assert len(stages) == 2
    build, final = stages
    for stage in stages:
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?", stage.base), stage.base
    assert "HEALTHCHECK" not in {kw for stage in stages for kw, _ in stage.instructions}

    uid = _uid(final)
    assert uid != 0
    copies = final.all("COPY")
    assert copies == [f"--from={build.name} /opt/a3mailer-exporter /opt/a3mailer-exporter"]
    for run in final.all("RUN"):
        assert not re.search(r"\b(pip|apt-get|apt|gcc|make|build-essential)\b", run), run
    assert final.one("STOPSIGNAL") == "SIGTERM"
    assert exec_form(final.one("ENTRYPOINT")) == ["a3mailer-exporter", "run"]
    cmd = exec_form(final.one("CMD"))
    assert cmd[0::2] == ["--listen", "--state-dir"]
    listen, state_dir = cmd[1], cmd[3]
    assert final.one("EXPOSE") == listen.rpartition(":")[2] == "10587"
    assert exec_form(final.one("VOLUME")) == [state_dir]
    assert final.one("WORKDIR") == state_dir
    assert f"-o {uid} -g {uid}" in final.one("RUN") and state_dir in final.one("RUN")
    assert "PYTHONDONTWRITEBYTECODE=1" in final.one("ENV")
    assert any("scripts/image-venv.sh" in run for run in build.all("RUN"))


def _world_reachable(path: Path) -> bool:
    """Whether a user other than the owner can reach and run ``path``."""
    resolved = path.resolve()
    for parent in resolved.parents:
        if not parent.stat().st_mode & stat.S_IXOTH:
            return False
    return bool(resolved.stat().st_mode & stat.S_IXOTH)


def _base_python() -> Path:
    """A Python 3.11 for the venv: the image's is /usr/local/bin/python3.11, readable by
    every user, so prefer one the non-root UID can run too."""
    candidates = [Path(getattr(sys, "_base_executable", sys.executable)),
                  Path("/usr/local/bin/python3.11"), Path("/usr/bin/python3.11")]
    found = [c for c in candidates if c.exists() and c.resolve().name.startswith("python3.11")]
    assert found, "no Python 3.11 interpreter to build the image's venv with"
    return next((c for c in found if _world_reachable(c)), found[0])


@dataclass
class ImageTree:
    root: Path  # stands for the image's /
    venv: Path  # /opt/a3mailer-exporter
    python: Path
    run_as: int | None  # the Dockerfile's USER when we can switch to it


def _snapshot(tree: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(tree)): (p.lstat().st_mtime_ns, p.lstat().st_size)
            for p in sorted(tree.rglob("*"))}


@pytest.fixture(scope="session")
def image_tree(stages: list[Stage]) -> Iterator[ImageTree]:
    """The build stage run for real: COPY lines lay out the context in <root>/src (the
    WORKDIR), RUN lines run there with /src and /opt mapped under <root>."""
    build, final = stages
    root = Path(tempfile.mkdtemp(prefix="a3m-image-"))
    root.chmod(0o755)  # like /: every user may traverse it
    try:
        workdir = build.one("WORKDIR")
        src = root / workdir.lstrip("/")
        src.mkdir(parents=True)
        for copy in build.all("COPY"):
            *sources, dest = shlex.split(copy)
            base = root / dest.lstrip("/") if dest.startswith("/") else src / dest
            for source in sources:
                target = base / Path(source).name if dest.endswith("/") else base
                origin = ROOT / source
                target.parent.mkdir(parents=True, exist_ok=True)
                if origin.is_dir():
                    shutil.copytree(origin, target,
                                    ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy2(origin, target)
        python = _base_python()
        for run in build.all("RUN"):
            argv = [root / a.lstrip("/") if a.startswith(("/src", "/opt")) else a
                    for a in shlex.split(run)]
            if "scripts/image-venv.sh" in map(str, argv):
                argv.append(python)  # the script's PYTHON argument (python3 in the image)
            done = subprocess.run([str(a) for a in argv], cwd=src, capture_output=True,
                                  text=True, timeout=300)
            assert done.returncode == 0, f"RUN {run} failed:\n{done.stdout}\n{done.stderr}"
        venv = root / "opt/a3mailer-exporter"
        run_as = _uid(final) if os.geteuid() == 0 and _world_reachable(python) else None
        if os.geteuid() == 0 and run_as is None:
            _missing(f"{python} is not reachable by other users: cannot run as the "
                     "image's non-root USER")
        yield ImageTree(root, venv, python, run_as)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower().replace("_", "-")
            for r in requirements}


def test_venv_holds_the_runtime_only(image_tree: ImageTree) -> None:
    """The installed venv: the exporter from its wheel, not from the source tree; every
    runtime dependency of pyproject.toml and none of the dev extra's own packages, no pip,
    no setuptools, no tests package."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = _names(project["dependencies"])
    dev_only = _names(project["optional-dependencies"]["dev"]) - runtime
    probe = ("import importlib.metadata as m, importlib.util, exporter, security; "
             "print(exporter.__file__); "
             "print(sorted({d.metadata['Name'] for d in m.distributions()})); "
             "print(sorted({r for d in m.distributions() for r in (d.requires or []) "
             "if 'extra ==' not in r})); "
             "print(bool(importlib.util.find_spec('tests')))")
    done = subprocess.run([str(image_tree.venv / "bin/python"), "-c", probe],
                          cwd=image_tree.root, capture_output=True, text=True, check=True)
    location, installed_text, required_text, has_tests = done.stdout.splitlines()
    assert Path(location).is_relative_to(image_tree.venv / "lib"), location
    installed = _names(ast.literal_eval(installed_text))
    required = _names(ast.literal_eval(required_text))  # what the runtime pulls in
    assert dev_only and not installed & dev_only - required, installed & dev_only - required
    assert not installed & {"pip", "setuptools", "wheel"}
    assert runtime - {"uvloop"} <= installed  # uvloop only where its marker holds
    assert has_tests == "False"


def test_image_starts_read_only(image_tree: ImageTree, stages: list[Stage],
                                tmp_path: Path) -> None:
    """ENTRYPOINT + CMD from the venv as the non-root USER: /livez, /readyz (the state dir
    check is critical) and /metrics answer, the state lands in the volume, nothing in the
    venv changes, and SIGTERM (the STOPSIGNAL) drains and exits 0."""
    final = stages[1]
    entry = exec_form(final.one("ENTRYPOINT"))
    volume = image_tree.root / exec_form(final.one("VOLUME"))[0].lstrip("/")
    volume.mkdir(parents=True)
    if image_tree.run_as is not None:
        os.chown(volume, image_tree.run_as, image_tree.run_as)
    env = {"HOME": str(volume), "PATH": "/usr/local/bin:/usr/bin:/bin"}
    for assignment in shlex.split(final.one("ENV")):
        key, _, value = assignment.partition("=")
        env[key] = value.replace("/opt/", f"{image_tree.root}/opt/").replace(
            "$PATH", "/usr/local/bin:/usr/bin:/bin")
    before = _snapshot(image_tree.venv)

    proc = ExporterProcess(tmp_path, command=[str(image_tree.venv / "bin" / entry[0])],
                           state_dir=volume, env=env, user=image_tree.run_as, cwd=volume)
    assert entry[1:] == ["run"]  # ExporterProcess adds `run --listen ... --state-dir ...`
    try:
        proc.start()
        if image_tree.run_as is not None:
            status = Path(f"/proc/{proc.proc.pid}/status").read_text()
            assert re.search(rf"^Uid:\s+{image_tree.run_as}\s", status, re.M), status
        assert httpx.get(proc.url + "/livez").status_code == 200
        ready = httpx.get(proc.url + "/readyz")
        assert ready.status_code == 200, ready.text
        metrics = httpx.get(proc.url + "/metrics").text
        assert 'a3mailer_health_status{component="state_dir",status="healthy"} 1.0' in metrics
        assert "a3mailer_exporter_build_info{" in metrics
    finally:
        code = proc.stop()
    assert code == 0, proc.log()
    assert "Traceback" not in proc.log()
    written = list(volume.iterdir())
    assert written, "nothing written to the state dir"
    if image_tree.run_as is not None:
        assert {p.stat().st_uid for p in written} == {image_tree.run_as}
    assert _snapshot(image_tree.venv) == before, "the exporter wrote into its venv"

