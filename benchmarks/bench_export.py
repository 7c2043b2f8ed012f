"""Benchmark "export": what sending one batch of spans costs over OTLP/HTTP and OTLP/gRPC.

One ExportTraceServiceRequest of 512 decision-shaped spans (a policy request's three:
the HTTP server span, its security check and the check's store call, with their usual
attributes), encoded once by exporter/otlp.py, sent again and again by the exporter's
two senders, `Sender` (http/protobuf, one kept-alive http.client connection) and
`GrpcSender` (grpc, one grpcio channel), to sinks in a child process that read and drop
it (a ThreadingHTTPServer and a grpcio server), so their CPU is nobody's under test.
Per batch: this process's CPU (every thread: grpcio's own included) and wall time, the
two protocols rotated within every round. The encoding, the same for both, is not in it
(bench_tracing.py's spans part has the whole cost per span).

Run: .venv/bin/python benchmarks/bench_export.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.server
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import free_port, ratio, say, stop, summary, wait_for_port, write_result
from opentelemetry.trace import SpanKind

from exporter import __version__
from exporter.otlp import EXPORT_METHOD, Encoder, GrpcSender, Sender
from exporter.tracing import SCOPE, TRACES_PATH, Span, Trace, TracingSettings, resource

BATCH = TracingSettings().batch_size
SHAPE = (  # name, kind, attributes: the spans of one traced policy request
    ("POST /dovecot/policy", SpanKind.SERVER,
     {"http.request.method": "POST", "http.route": "/dovecot/policy",
      "url.path": "/dovecot/policy", "url.scheme": "http", "server.port": 10587,
      "network.protocol.version": "1.1", "http.response.status_code": 200}),
    ("security check", SpanKind.INTERNAL,
     {"a3mailer.security.protocol": "imap", "a3mailer.security.action": "allow",
      "a3mailer.security.reason": "ok"}),
    ("store login_state", SpanKind.INTERNAL,
     {"db.system.name": "sqlite", "db.operation.name": "login_state"}),
)


@dataclass
class Mode:
    rounds: int
    batches: int  # per protocol per round


FULL = Mode(rounds=10, batches=200)
QUICK = Mode(rounds=2, batches=20)


# --- the sinks (a child process) ---------------------------------------------------------


def sink_main(http_port: int, grpc_port: int) -> int:
    """Drops OTLP/HTTP POSTs and OTLP/gRPC Export calls, answering success."""
    import grpc

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            return None

    service, method = EXPORT_METHOD.strip("/").split("/")
    handler = grpc.method_handlers_generic_handler(service, {
        method: grpc.unary_unary_rpc_method_handler(lambda body, context: b"")})
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2),
                         handlers=(handler,))
    server.add_insecure_port(f"127.0.0.1:{grpc_port}")
    server.start()
    web = http.server.ThreadingHTTPServer(("127.0.0.1", http_port), Handler)
    web.daemon_threads = True
    web.serve_forever()
    return 0


def start_sinks() -> tuple[subprocess.Popen[bytes], int, int]:
    http_port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--sink", str(http_port),
                             str(grpc_port)])
    wait_for_port(http_port, proc)
    wait_for_port(grpc_port, proc)
    return proc, http_port, grpc_port


# --- the batch -----------------------------------------------------------------------------


def batch_body() -> bytes:
    """One request of BATCH spans shaped like traced policy requests, fresh ids and times."""
    encoder = Encoder(resource("a3mailer-exporter").attributes, SCOPE, __version__)
    spans = []
    now = time.time_ns()
    while len(spans) < BATCH:
        trace = Trace(random.getrandbits(128) or 1, 1, None, -1)
        parent = 0
        for name, kind, attributes in SHAPE:
            span = Span(trace, parent, "bench", "x", name, kind, attributes, "")
            span.start_ns, span.end_ns = now, now + 250_000
            spans.append(span)
            parent = span.span_id
    return encoder.encode(spans[:BATCH])


def bench(mode: Mode, http_port: int, grpc_port: int) -> dict[str, Any]:
    body = batch_body()
    halt = threading.Event()
    senders = {"http/protobuf": Sender(f"http://127.0.0.1:{http_port}{TRACES_PATH}", {},
                                       10.0, halt),
               "grpc": GrpcSender(f"http://127.0.0.1:{grpc_port}", {}, 10.0, halt)}
    cpu: dict[str, list[float]] = {name: [] for name in senders}
    wall: dict[str, list[float]] = {name: [] for name in senders}
    try:
        for sender in senders.values():  # warm-up: connections up, code paths hot
            for _ in range(max(5, mode.batches // 10)):
                assert sender.send(body)
        names = list(senders)
        for round_number in range(mode.rounds):
            order = names if round_number % 2 == 0 else names[::-1]
            for name in order:
                sender = senders[name]
                c0, w0 = time.process_time(), time.perf_counter()
                for _ in range(mode.batches):
                    if not sender.send(body):
                        raise RuntimeError(f"{name}: the sink refused a batch")
                cpu[name].append((time.process_time() - c0) / mode.batches * 1e6)
                wall[name].append((time.perf_counter() - w0) / mode.batches * 1e6)
            say(f"round {round_number + 1}: " + ", ".join(
                f"{n} {cpu[n][-1]:.0f} µs CPU" for n in names))
    finally:
        for sender in senders.values():
            sender.close()
    cases = {name: {"cpu_us_per_batch": summary(cpu[name]),
                    "wall_us_per_batch": summary(wall[name]),
                    "cpu_us_per_span": summary(cpu[name])["median"] / BATCH}
             for name in senders}
    per_round = [ratio(g, h) for g, h in zip(cpu["grpc"], cpu["http/protobuf"], strict=True)]
    return {"rounds": mode.rounds, "batches_per_round": mode.batches, "spans_per_batch": BATCH,
            "bytes_per_batch": len(body), "cases": cases,
            "ratios": {"grpc/http cpu": summary(per_round)["median"],
                       "grpc/http cpu per round": summary(per_round)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds: a smoke run")
    parser.add_argument("--out", type=Path, help="result file (default results/export.json)")
    parser.add_argument("--sink", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        return sink_main(*args.sink)
    mode = QUICK if args.quick else FULL
    sinks, http_port, grpc_port = start_sinks()
    try:
        result = bench(mode, http_port, grpc_port)
    finally:
        stop(sinks)
    path = write_result("export", args.out, {
        "mode": "quick" if args.quick else "full",
        "issue": "performance and tracing",
        "baselines": {"export": "the same batch over OTLP/HTTP"},
        "export": result,
    })
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
