"""`a3mailer-exporter security ...` and `audit verify`: the admin API from a shell.

The running exporter owns the store, so commands that change state go through
its HTTP API (with the admin token); `audit verify` reads the file directly and
works with the exporter stopped.
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from security import no_redirect

DEFAULT_URL = "http://127.0.0.1:10587"
DEFAULT_TIMEOUT = 30.0


def add_parsers(sub: Any) -> None:
    sec = sub.add_parser("security", help="lockouts and bans of a running exporter")
    sec.add_argument("--url", default=os.environ.get("A3MAILER_URL", DEFAULT_URL),
                     help=f"exporter base URL (default {DEFAULT_URL}, or $A3MAILER_URL)")
    sec.add_argument("--token-file", help="file holding the admin token "
                                          "(default: $A3MAILER_ADMIN_TOKEN)")
    sec.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT,
                     help=f"seconds for the whole request (default {DEFAULT_TIMEOUT:g})")
    # the same two options after the action too (`security unlock bob --url ...`); not
    # given there, they keep what came before it or the defaults
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("--url", default=argparse.SUPPRESS, help="as before the action")
    after.add_argument("--token-file", default=argparse.SUPPRESS, help="as before the action")
    after.add_argument("--timeout", type=_seconds, default=argparse.SUPPRESS,
                       help="as before the action")
    actions = sec.add_subparsers(dest="action", required=True)
    actions.add_parser("list", parents=[after],
                       help="list lockouts in force and banned networks")
    actions.add_parser("lockouts", parents=[after], help="list lockouts in force")
    unlock = actions.add_parser("unlock", parents=[after], help="lift an account's lockouts")
    unlock.add_argument("account")
    unlock.add_argument("--source", help="only the lockout for this network (e.g. 192.0.2.7/32)")
    actions.add_parser("bans", parents=[after], help="list banned networks")
    ban = actions.add_parser("ban", parents=[after], help="ban an IP address or CIDR")
    ban.add_argument("network")
    ban.add_argument("--reason", default="")
    ban.add_argument("--duration", help="e.g. 1h, 7d (default: until unbanned)")
    unban = actions.add_parser("unban", parents=[after], help="lift a ban")
    unban.add_argument("network")
    imp = actions.add_parser("import", parents=[after],
                             help="ban the networks listed in a text file")
    imp.add_argument("file")
    imp.add_argument("--feed", default="", help="mark the entries as feed:NAME")
    actions.add_parser("export", parents=[after], help="print the bans as plain text")

    audit = sub.add_parser("audit", help="the audit log")
    audit_actions = audit.add_subparsers(dest="action", required=True)
    verify = audit_actions.add_parser("verify", help="check the hash chain; exit 1 if broken")
    verify.add_argument("--file", help="audit log file (default: STATE_DIR/audit.log)")
    verify.add_argument("--state-dir", default="/var/lib/a3mailer-exporter")


def run_security(args: argparse.Namespace) -> int:
    try:
        token = _token(args.token_file)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        print(f"{args.token_file}: cannot read the admin token: {reason}", file=sys.stderr)
        return 2
    if token is None:
        where = (f"{args.token_file} is empty" if args.token_file
                 else "use --token-file or set A3MAILER_ADMIN_TOKEN")
        print(f"no admin token: {where}", file=sys.stderr)
        return 2
    base = args.url.rstrip("/") + "/api/v1/security"
    call = functools.partial(_call, token=token, timeout=args.timeout)
    action = args.action
    if action == "list":
        locks_status, locks = call("GET", f"{base}/lockouts")
        bans_status, bans = call("GET", f"{base}/blocklist")
        status = max(locks_status, bans_status)
        body = {**locks, **bans} if status < 300 else locks if locks_status >= 300 else bans
    elif action == "lockouts":
        status, body = call("GET", f"{base}/lockouts")
    elif action == "unlock":  # ?account=: a login may hold a "/"
        query = urllib.parse.urlencode({"account": args.account,
                                        **({"source": args.source} if args.source else {})})
        status, body = call("DELETE", f"{base}/lockouts?{query}")
    elif action == "bans":
        status, body = call("GET", f"{base}/blocklist")
    elif action == "ban":
        from exporter.config import parse_duration

        try:
            duration = parse_duration(args.duration) if args.duration else None
        except ValueError as exc:
            print(f"--duration: {exc} (e.g. 30m, 2h, 7d)", file=sys.stderr)
            return 2
        payload = {"network": args.network, "reason": args.reason,
                   "duration_seconds": duration}
        status, body = call("POST", f"{base}/blocklist", json.dumps(payload).encode())
    elif action == "unban":
        status, body = call("DELETE", f"{base}/blocklist?network="
                            + urllib.parse.quote(args.network))
    elif action == "import":
        feed = f"?feed={urllib.parse.quote(args.feed)}" if args.feed else ""
        try:
            text = Path(args.file).read_bytes()
        except OSError as exc:
            print(f"{args.file}: cannot read: {exc.strerror}", file=sys.stderr)
            return 2
        status, body = call("POST", f"{base}/blocklist.txt{feed}", text, "text/plain")
    else:  # export
        status, body = call("GET", f"{base}/blocklist.txt")
    print(body if isinstance(body, str) else json.dumps(body, indent=2))
    return 0 if status < 300 else 1


def run_audit(args: argparse.Namespace) -> int:
    from security.audit import verify_file

    path = Path(args.file) if args.file else Path(args.state_dir) / "audit.log"
    try:
        result = verify_file(path)
    except OSError as exc:
        print(f"{path}: {exc.strerror}", file=sys.stderr)
        return 2
    print(f"{path}: {result}")
    return 0 if result.ok else 1


def _token(path: str | None) -> str | None:
    if path:
        return Path(path).read_text(encoding="utf-8").strip() or None  # not `Bearer `
    return os.environ.get("A3MAILER_ADMIN_TOKEN") or None


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"not a number of seconds above 0: {text!r}")
    return seconds


def _call(method: str, url: str, data: bytes | None = None,
          content_type: str = "application/json", *, token: str,
          timeout: float) -> tuple[int, Any]:
    if not url.startswith(("http://", "https://")):
        return 599, {"error": "bad_url", "message": f"not an http(s) URL: {url}"}
    request = urllib.request.Request(url, data=data, method=method, headers={  # noqa: S310
        "Authorization": f"Bearer {token}", "Content-Type": content_type})
    try:
        # never redirected: the token would go along to whatever the Location names;
        # `timeout` bounds the whole exchange, not each read
        with no_redirect.open_within(request, timeout) as response:
            status, raw, kind = response.status, response.read(), response.headers.get(
                "content-type", "")
    except urllib.error.HTTPError as exc:
        if 300 <= exc.code < 400:
            return exc.code, {"error": "redirected", "message": (
                f"the server answered {exc.code} to {exc.headers.get('location', '?')}; not "
                "followed, as the admin token would go along: point --url at the exporter")}
        try:
            status, raw, kind = exc.code, exc.read(), exc.headers.get("content-type", "")
        except (OSError, http.client.HTTPException) as error:
            return 599, _unreachable(error, timeout)
    except urllib.error.URLError as exc:
        return 599, _unreachable(exc.reason, timeout)
    except (OSError, http.client.HTTPException) as exc:
        return 599, _unreachable(exc, timeout)
    text = raw.decode("utf-8", errors="replace")
    return status, json.loads(text) if "json" in kind else text


def _unreachable(reason: object, timeout: float) -> dict[str, str]:
    if isinstance(reason, TimeoutError):
        return {"error": "timed_out", "message": f"no complete answer within {timeout:g} s"}
    return {"error": "unreachable", "message": str(reason)}
