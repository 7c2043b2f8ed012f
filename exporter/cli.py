"""Command line: run | check-config | generate | hash-password | security | audit | version."""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import gc
import getpass
import logging
import os
import platform
import signal
import ssl
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import IO, Any

from exporter import __version__, cli_security, logs
from exporter.config import Config, ConfigError, load_config

log = logging.getLogger("exporter")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="a3mailer-exporter",
        description="Monitoring, health and login-security engines for A3Mailer, Postfix "
                    "and Dovecot, published as Prometheus metrics.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start the exporter")
    run.add_argument("--config", metavar="FILE", help="YAML file merged over the embedded "
                                                     "defaults (default: defaults only)")
    run.add_argument("--listen", metavar="HOST:PORT", help="overrides server.listen_address")
    run.add_argument("--state-dir", metavar="DIR", help="overrides server.state_dir")

    check = sub.add_parser("check-config", help="validate a config file: exit 0 valid, 2 not")
    check.add_argument("file", metavar="FILE")

    gen = sub.add_parser("generate", help="write the files generated from the schema, "
                                          "the config and the metric catalogue")
    gen.add_argument("--config", metavar="FILE", help="config whose thresholds drive the output")
    gen.add_argument("--out", metavar="DIR", default=".", help="project root to write into")
    gen.add_argument("--check", action="store_true",
                     help="write nothing; exit 1 and name the stale files")

    sub.add_parser("hash-password", help="read a password on stdin, print its bcrypt hash "
                                         "for server.auth.basic_auth_users")
    sub.add_parser("version", help="print the version")
    cli_security.add_parsers(sub)

    args = parser.parse_args(argv)
    handler = {"run": _run, "check-config": _check_config, "generate": _generate,
               "hash-password": _hash_password, "version": _version,
               "security": cli_security.run_security, "audit": cli_security.run_audit,
               }[args.command]
    return handler(args)


def _version(args: argparse.Namespace) -> int:
    print(f"a3mailer-exporter {__version__} (Python {platform.python_version()})")
    return 0


def _check_config(args: argparse.Namespace) -> int:
    try:
        load_config(args.file)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"{args.file}: valid")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from exporter.generate import generate

    try:
        changed = generate(Path(args.out), check=args.check, config_path=args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except OSError as exc:  # --out not writable, or not a directory
        print(f"{exc.filename or args.out}: cannot write: {exc.strerror}", file=sys.stderr)
        return 2
    if args.check:
        for path in changed:
            print(f"stale: {path} (run `a3mailer-exporter generate`)", file=sys.stderr)
        return 1 if changed else 0
    for path in changed:
        print(f"wrote {path}")
    return 0


def _hash_password(args: argparse.Namespace) -> int:
    import bcrypt

    from exporter.http.auth import BCRYPT_MAX_BYTES

    try:
        password = getpass.getpass("Password: ") if sys.stdin.isatty() else sys.stdin.readline()
    except UnicodeDecodeError:
        print("the password is not UTF-8", file=sys.stderr)
        return 2
    secret = password.rstrip("\r\n").encode("utf-8")
    if not secret:
        print("empty password", file=sys.stderr)
        return 2
    if len(secret) > BCRYPT_MAX_BYTES:
        print(f"password longer than {BCRYPT_MAX_BYTES} bytes (bcrypt reads no further)",
              file=sys.stderr)
        return 2
    print(bcrypt.hashpw(secret, bcrypt.gensalt(rounds=10)).decode())
    return 0


def _run(args: argparse.Namespace) -> int:
    from exporter.config.loader import listen_problem

    server: dict[str, Any] = {}
    # the overrides are merged over a checked config: checked here, as the schema would
    if args.listen is not None:
        if (wrong := listen_problem(args.listen)) is not None:
            print(f"--listen: {wrong}", file=sys.stderr)
            return 2
        server["listen_address"] = args.listen
    if args.state_dir is not None:
        if not args.state_dir:
            print("--state-dir: must not be empty", file=sys.stderr)
            return 2
        server["state_dir"] = args.state_dir
    try:
        config = load_config(args.config, {"server": server} if server else None)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    logs.setup(config["logging"]["level"], config["logging"]["format"])
    from security.audit import AuditLogLocked

    try:
        lock = hold_state_dir(Path(config["server"]["state_dir"]))
    except OSError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner, lock:
        try:
            return runner.run(serve(config))
        except AuditLogLocked as exc:  # an audit log outside the state dir, in use
            print(exc, file=sys.stderr)
            return 2


def hold_state_dir(state_dir: Path) -> IO[bytes]:
    """An exclusive lock on the state dir for the life of the process: two exporters on
    one SQLite store and audit log disagree about keys and bans (a revoke through one is
    404 on the other), and the second used to start without a word. OSError says which
    process holds it."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = open(state_dir / "exporter.lock", "a+b")  # noqa: SIM115 - held until exit
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().decode(errors="replace").strip() or "another process"
        lock.close()
        raise OSError(f"{state_dir}: in use by another exporter (pid {holder}); give each "
                      "process a state dir of its own (server.state_dir)") from None
    lock.truncate(0)
    lock.write(str(os.getpid()).encode())
    lock.flush()
    return lock


def split_listen(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


async def serve(config: Config) -> int:
    """Runs until SIGTERM/SIGINT; SIGHUP reloads. Returns the exit code."""
    import uvicorn

    from exporter.http import create_app
    from exporter.http.coalesce import CoalescingHttpToolsProtocol
    from exporter.service import Exporter

    class Server(uvicorn.Server):
        # We own the signal handlers (SIGHUP reloads; SIGTERM exits 0 after draining).
        def capture_signals(self):  # type: ignore[no-untyped-def]
            return nullcontext()

    exporter = Exporter(config)
    host, port = split_listen(config["server"]["listen_address"])
    tls = config["server"]["tls"]
    uv_config = uvicorn.Config(
        create_app(exporter), host=host, port=port, lifespan="off", log_config=None,
        http=CoalescingHttpToolsProtocol,
        access_log=False, server_header=False, proxy_headers=False,
        timeout_graceful_shutdown=int(config.seconds("server", "graceful_shutdown_timeout")),
        ssl_certfile=tls["cert_file"] or None, ssl_keyfile=tls["key_file"] or None,
        ssl_ca_certs=tls["client_ca_file"] or None,
        ssl_cert_reqs=ssl.CERT_REQUIRED if tls["client_ca_file"] else ssl.CERT_NONE,
    )
    server = Server(uv_config)
    loop = asyncio.get_running_loop()

    def stop(signame: str) -> None:
        log.info("shutting down", extra={"signal": signame})
        server.should_exit = True

    loop.add_signal_handler(signal.SIGTERM, stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, stop, "SIGINT")
    loop.add_signal_handler(signal.SIGHUP, exporter.reload_soon)
    await exporter.start()
    # What start-up built (modules, config, engines, the security state loaded from disk)
    # lives as long as the process: frozen out of the collector's generations, a full
    # collection no longer walks it, nor the failure table (tens of ms once it is full).
    gc.collect()
    gc.freeze()
    log.info("exporter started", extra={"version": __version__, "listen": f"{host}:{port}",
                                        "config": config.source,
                                        "state_dir": str(exporter.state_dir)})
    try:
        await server.serve()
    finally:
        await exporter.stop()
    if not server.started:
        return 1
    log.info("exporter stopped")
    return 0
