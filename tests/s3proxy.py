#!/usr/bin/env python3
"""Counting / fault-injecting reverse HTTP proxy in front of an S3 endpoint.

Run as its own process:

    python tests/s3proxy.py --listen-port 0 --upstream http://127.0.0.1:5000

Prints ``READY <port>`` on stdout once listening.  Every request is forwarded
to the upstream unchanged (method, path, query, headers including Host, body)
and the response is streamed back in 64 KiB pieces, unless an armed fault
matches.  A JSON control API lives under ``/__proxy__/`` on the same port
(``__proxy__`` is not a valid bucket name, so it cannot collide with S3):

    GET  /__proxy__/health        -> {"ok": true}
    GET  /__proxy__/stats         -> counters (see Stats.snapshot)
    POST /__proxy__/reset         -> zero counters and disarm all faults
    POST /__proxy__/faults        -> arm one fault (JSON object) or several (list)
    GET  /__proxy__/faults        -> currently armed faults
    POST /__proxy__/faults/clear  -> disarm all faults, keep counters

See docs/testing-s3proxy.md for the fault specification.  Stdlib only.
"""

from __future__ import annotations

import argparse
import html
import http.client
import json
import os
import random
import re
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, unquote, urlsplit

PIECE = 64 * 1024
CONTROL_PREFIX = "/__proxy__/"

OPS = ("GetObject", "HeadObject", "ListObjects", "PutObject", "other")

# Hop-by-hop headers (RFC 9110 7.6.1) are never forwarded; Expect is handled
# by this proxy (BaseHTTPRequestHandler answers "100 Continue" itself).
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "expect",
}

# Query parameters that turn "GET /bucket/key" into something other than
# GetObject (ACLs, tagging, ...).
OBJECT_SUBRESOURCES = {
    "acl",
    "attributes",
    "legal-hold",
    "retention",
    "tagging",
    "torrent",
    "uploadId",
    "uploads",
    "restore",
    "select",
}
# Query parameters that turn "GET /bucket" into something other than a listing.
BUCKET_SUBRESOURCES = {
    "accelerate",
    "acl",
    "analytics",
    "cors",
    "encryption",
    "intelligent-tiering",
    "inventory",
    "lifecycle",
    "location",
    "logging",
    "metrics",
    "notification",
    "object-lock",
    "ownershipControls",
    "policy",
    "policyStatus",
    "publicAccessBlock",
    "replication",
    "requestPayment",
    "tagging",
    "uploads",
    "versioning",
    "versions",
    "website",
}

DEFAULT_CODES = {
    400: "BadRequest",
    403: "AccessDenied",
    404: "NoSuchKey",
    408: "RequestTimeout",
    409: "OperationAborted",
    416: "InvalidRange",
    429: "SlowDown",
    500: "InternalError",
    501: "NotImplemented",
    502: "BadGateway",
    503: "SlowDown",
    504: "GatewayTimeout",
}


def classify(method: str, raw_path: str) -> tuple[str, str, str, str]:
    """Return (op, detail, bucket, key) for a path-style S3 request.

    ``op`` is one of OPS; ``detail`` is a finer name for ``other`` requests.
    """
    parts = urlsplit(raw_path)
    path = parts.path.lstrip("/")
    query = {k for k, _ in parse_qsl(parts.query, keep_blank_values=True)}
    if not path:
        return ("other", "ListBuckets" if method == "GET" else f"{method} /", "", "")
    bucket_raw, _, key_raw = path.partition("/")
    bucket = unquote(bucket_raw)
    key = unquote(key_raw)
    if key:
        if method == "GET":
            if query & OBJECT_SUBRESOURCES:
                return ("other", "GetObjectSubresource", bucket, key)
            return ("GetObject", "GetObject", bucket, key)
        if method == "HEAD":
            return ("HeadObject", "HeadObject", bucket, key)
        if method == "PUT":
            if "partNumber" in query or "uploadId" in query:
                return ("other", "UploadPart", bucket, key)
            if query & OBJECT_SUBRESOURCES:
                return ("other", "PutObjectSubresource", bucket, key)
            return ("PutObject", "PutObject", bucket, key)
        if method == "DELETE":
            return ("other", "DeleteObject", bucket, key)
        if method == "POST":
            if "uploads" in query:
                return ("other", "CreateMultipartUpload", bucket, key)
            if "uploadId" in query:
                return ("other", "CompleteMultipartUpload", bucket, key)
        return ("other", f"{method} object", bucket, key)
    if method == "GET":
        if query & BUCKET_SUBRESOURCES:
            return ("other", "GetBucketSubresource", bucket, "")
        return ("ListObjects", "ListObjects", bucket, "")
    if method == "HEAD":
        return ("other", "HeadBucket", bucket, "")
    if method == "PUT":
        return ("other", "CreateBucket" if not query else "PutBucketSubresource", bucket, "")
    if method == "DELETE":
        return ("other", "DeleteBucket", bucket, "")
    if method == "POST" and "delete" in query:
        return ("other", "DeleteObjects", bucket, "")
    return ("other", f"{method} bucket", bucket, "")


def error_xml(code: str, message: str, resource: str = "") -> bytes:
    def esc(s: str) -> str:
        return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{esc(code)}</Code><Message>{esc(message)}</Message>"
        f"<Resource>{esc(resource)}</Resource>"
        f"<RequestId>{uuid.uuid4().hex[:16].upper()}</RequestId></Error>"
    ).encode()


# --------------------------------------------------------------------------- faults

FAULT_KINDS = (
    "etag_form",
    "persistent_status",
    "status",
    "truncate",
    "error_body_200",
    "delay",
    "stall_mid_body",
    "drop",
    "extra_bytes",
    "repeat_entries",
    "no_continuation",
    "ignore_if_match",
)


class Fault:
    """One armed fault.  ``remaining`` is None for unlimited."""

    _ids = 0

    def __init__(self, spec: dict):
        if not isinstance(spec, dict):
            raise ValueError("fault spec must be a JSON object")
        kinds = [k for k in FAULT_KINDS if k in spec]
        if len(kinds) != 1:
            raise ValueError(f"fault spec needs exactly one of {FAULT_KINDS}: {spec!r}")
        known = set(FAULT_KINDS) | {
            "count",
            "code",
            "message",
            "rate",
            "seed",
            "ops",
            "key_filter",
            "skip",
        }
        unknown = set(spec) - known
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        Fault._ids += 1
        self.id = Fault._ids
        self.spec = dict(spec)
        self.kind = kinds[0]
        value = spec[self.kind]
        ops = spec.get("ops", ["GetObject"])
        if isinstance(ops, str):
            ops = [ops]
        self.ops = set(ops)
        self.key_filter = spec.get("key_filter")
        self.skip = int(spec.get("skip", 0))
        self.rate = spec.get("rate")
        self.rng = random.Random(spec.get("seed", 0)) if self.rate is not None else None
        self.status = None
        self.seconds = 0.0
        count = spec.get("count")

        if self.kind == "persistent_status":
            self.status = int(value)
            count = None if count is None else count
        elif self.kind == "status":
            self.status = int(value)
            if count is None:
                count = None if self.rate is not None else 1
        elif self.kind in ("truncate", "error_body_200", "drop"):
            if count is None:
                count = int(value)
        elif self.kind == "extra_bytes":  # value: bytes appended past the real body
            self.extra = int(value)
            if count is None:
                count = 1
        elif self.kind in ("repeat_entries", "no_continuation", "ignore_if_match"):  # value: true
            pass
        elif self.kind == "etag_form":  # value: "bare", "weak" or "none"; every match by default
            if value not in ("bare", "weak", "none"):
                raise ValueError('etag_form must be "bare", "weak" or "none"')
            self.form = value
        elif self.kind in ("delay", "stall_mid_body"):
            self.seconds = float(value)
            if count is None:
                count = 1
        if count is not None and int(count) < 0:
            count = None  # -1 means unlimited
        self.remaining = None if count is None else int(count)
        if self.status is not None:
            self.code = spec.get("code") or DEFAULT_CODES.get(self.status, "InternalError")
            self.message = spec.get("message") or f"Injected fault {self.code} by s3proxy"
        self.fired = 0

    def reform(self, etag: str) -> str:
        """``etag`` ("abc", quoted as S3 sends it) in this fault's form ("" for none)."""
        core = etag.strip().removeprefix("W/").strip('"')
        if self.form == "none":
            return ""
        return core if self.form == "bare" else f'W/"{core}"'

    def exhausted(self) -> bool:
        return self.remaining is not None and self.remaining <= 0

    def try_fire(self, op: str, detail: str, key: str) -> bool:
        """Called under the state lock.  Return True if this fault applies."""
        if self.exhausted():
            return False
        if "*" not in self.ops and op not in self.ops and detail not in self.ops:
            return False
        if self.key_filter is not None and self.key_filter not in key:
            return False
        if self.skip > 0:
            self.skip -= 1
            return False
        if self.rng is not None and self.rng.random() >= float(self.rate):
            return False
        if self.remaining is not None:
            self.remaining -= 1
        self.fired += 1
        return True

    def describe(self) -> dict:
        d = dict(self.spec)
        d.update(id=self.id, kind=self.kind, remaining=self.remaining, fired=self.fired)
        return d


# --------------------------------------------------------------------------- state


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.faults: list[Fault] = []
        self.inflight = 0  # a gauge, not a counter: reset() leaves it alone
        self._zero()

    def _zero(self):
        self.total = 0
        self.ops = {op: 0 for op in OPS}
        self.other_ops: dict[str, int] = {}
        self.get_by_key: dict[str, int] = {}
        self.get_by_bucket_key: dict[str, int] = {}
        self.head_by_key: dict[str, int] = {}
        self.get_ranges: list[list] = []
        self.get_bytes = 0
        self.get_bytes_by_key: dict[str, int] = {}
        self.status_counts: dict[str, int] = {}
        self.faults_injected = 0
        self.faults_by_kind: dict[str, int] = {}
        self.max_inflight = self.inflight
        self.upstream_errors = 0

    def reset(self):
        with self.lock:
            self._zero()
            self.faults.clear()

    def record_request(self, op: str, detail: str, bucket: str, key: str, rng: str | None):
        with self.lock:
            self.total += 1
            self.ops[op] += 1
            if op == "other":
                self.other_ops[detail] = self.other_ops.get(detail, 0) + 1
            elif op == "GetObject":
                self.get_by_key[key] = self.get_by_key.get(key, 0) + 1
                bk = f"{bucket}/{key}"
                self.get_by_bucket_key[bk] = self.get_by_bucket_key.get(bk, 0) + 1
                if len(self.get_ranges) < 100_000:
                    self.get_ranges.append([key, rng])
            elif op == "HeadObject":
                self.head_by_key[key] = self.head_by_key.get(key, 0) + 1
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)

    def record_done(self, op: str, key: str, status: int | None, body_bytes: int):
        with self.lock:
            self.inflight -= 1
            if status is not None:
                s = str(status)
                self.status_counts[s] = self.status_counts.get(s, 0) + 1
            if op == "GetObject" and status is not None and 200 <= status < 300:
                self.get_bytes += body_bytes
                self.get_bytes_by_key[key] = self.get_bytes_by_key.get(key, 0) + body_bytes

    def pick_fault(self, op: str, detail: str, key: str) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.try_fire(op, detail, key):
                    self.faults_injected += 1
                    self.faults_by_kind[f.kind] = self.faults_by_kind.get(f.kind, 0) + 1
                    return f
            return None

    def arm(self, specs) -> list[dict]:
        if isinstance(specs, dict):
            specs = [specs]
        if not isinstance(specs, list):
            raise ValueError("expected a JSON object or list of objects")
        new = [Fault(s) for s in specs]
        with self.lock:
            self.faults.extend(new)
            return [f.describe() for f in new]

    def clear_faults(self):
        with self.lock:
            self.faults.clear()

    def snapshot(self) -> dict:
        with self.lock:
            return {
                "total": self.total,
                "ops": dict(self.ops),
                "other_ops": dict(self.other_ops),
                "get_by_key": dict(self.get_by_key),
                "get_by_bucket_key": dict(self.get_by_bucket_key),
                "head_by_key": dict(self.head_by_key),
                "get_ranges": [list(r) for r in self.get_ranges],
                "get_bytes": self.get_bytes,
                "get_bytes_by_key": dict(self.get_bytes_by_key),
                "status_counts": dict(self.status_counts),
                "faults_injected": self.faults_injected,
                "faults_by_kind": dict(self.faults_by_kind),
                "inflight": self.inflight,
                "max_inflight": self.max_inflight,
                "upstream_errors": self.upstream_errors,
                "armed_faults": [f.describe() for f in self.faults if not f.exhausted()],
            }


# --------------------------------------------------------------------------- HTTP


class ClientGone(Exception):
    """The downstream client went away while we were writing to it."""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "s3proxy/1"
    timeout = 600  # per-connection socket timeout, avoids leaking threads forever
    disable_nagle_algorithm = True  # TCP_NODELAY: no 40 ms Nagle/delayed-ACK stalls
    # set on the class by main()
    state: State
    upstream_host: str
    upstream_port: int
    verbose = False

    # ---- plumbing

    def setup(self):
        super().setup()
        self._up: http.client.HTTPConnection | None = None

    def finish(self):
        try:
            super().finish()
        finally:
            self._close_upstream()

    def log_message(self, fmt, *args):
        if self.verbose:
            sys.stderr.write("s3proxy: " + (fmt % args) + "\n")

    def _close_upstream(self):
        if self._up is not None:
            try:
                self._up.close()
            except Exception:
                pass
            self._up = None

    def _new_upstream(self) -> http.client.HTTPConnection:
        self._close_upstream()
        self._up = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=120)
        return self._up

    def _write(self, data: bytes):
        try:
            self.wfile.write(data)
        except (TimeoutError, BrokenPipeError, ConnectionResetError, OSError) as e:
            raise ClientGone() from e

    def _send_simple(self, status: int, body: bytes, content_type: str, extra=(), head=False):
        self.send_response_only(status)
        self.send_header("Date", self.date_time_string())
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self._write(body)

    def _send_json(self, status: int, obj):
        self._send_simple(status, json.dumps(obj).encode(), "application/json")

    # ---- request body

    def _iter_request_body(self):
        """Yield the request body in pieces (de-chunking if needed)."""
        te = self.headers.get("Transfer-Encoding", "")
        if "chunked" in te.lower():
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise ClientGone()
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # trailers until blank line
                    while True:
                        t = self.rfile.readline(65537)
                        if t in (b"\r\n", b"\n", b""):
                            break
                    return
                left = size
                while left:
                    piece = self.rfile.read(min(left, PIECE))
                    if not piece:
                        raise ClientGone()
                    left -= len(piece)
                    yield piece
                self.rfile.readline(3)  # CRLF after chunk
            return
        left = int(self.headers.get("Content-Length") or 0)
        while left > 0:
            piece = self.rfile.read(min(left, PIECE))
            if not piece:
                raise ClientGone()
            left -= len(piece)
            yield piece

    def _has_body(self) -> bool:
        return (
            "chunked" in self.headers.get("Transfer-Encoding", "").lower()
            or int(self.headers.get("Content-Length") or 0) > 0
        )

    def _drain_request_body(self):
        for _ in self._iter_request_body():
            pass

    # ---- dispatch

    def do_GET(self):
        self._handle()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def _handle(self):
        try:
            if self.path.startswith(CONTROL_PREFIX):
                self._control()
            else:
                self._proxy()
        except (ClientGone, OSError, http.client.HTTPException):
            # client vanished, or upstream failed mid-response: the client
            # connection is no longer coherent, hang up.
            self.close_connection = True
            self._close_upstream()

    # ---- control API

    def _control(self):
        body = b"".join(self._iter_request_body())
        route = urlsplit(self.path).path[len(CONTROL_PREFIX) :].strip("/")
        st = self.state
        try:
            if route == "health":
                return self._send_json(200, {"ok": True})
            if route == "stats" and self.command == "GET":
                return self._send_json(200, st.snapshot())
            if route == "reset" and self.command == "POST":
                st.reset()
                return self._send_json(200, {"ok": True})
            if route == "faults" and self.command == "GET":
                with st.lock:
                    return self._send_json(
                        200, [f.describe() for f in st.faults if not f.exhausted()]
                    )
            if route == "faults" and self.command == "POST":
                spec = json.loads(body or b"{}")
                return self._send_json(200, {"armed": st.arm(spec)})
            if (
                route in ("faults/clear",)
                and self.command == "POST"
                or (route == "faults" and self.command == "DELETE")
            ):
                st.clear_faults()
                return self._send_json(200, {"ok": True})
        except (ValueError, TypeError) as e:
            return self._send_json(400, {"error": str(e)})
        return self._send_json(404, {"error": f"unknown control route {self.command} {route!r}"})

    # ---- forwarding

    def _proxy(self):
        op, detail, bucket, key = classify(self.command, self.path)
        self.state.record_request(op, detail, bucket, key, self.headers.get("Range"))
        status = None
        sent = 0
        try:
            fault = self.state.pick_fault(op, detail, key)
            status, sent = self._proxy_with(fault, key)
        finally:
            self.state.record_done(op, key, status, sent)

    def _proxy_with(self, fault: Fault | None, key: str) -> tuple[int | None, int]:
        head = self.command == "HEAD"
        kind = fault.kind if fault else None

        if kind == "drop":
            if self._has_body():
                self._drain_request_body()
            self.close_connection = True
            return None, 0

        if kind in ("status", "persistent_status"):
            if self._has_body():
                self._drain_request_body()
            body = error_xml(fault.code, fault.message, urlsplit(self.path).path)
            extra = [("x-amz-request-id", uuid.uuid4().hex[:16].upper())]
            if fault.status == 503:
                extra.append(("Retry-After", "0"))
            self._send_simple(fault.status, body, "application/xml", extra, head=head)
            return fault.status, 0 if head else len(body)

        if kind == "delay":
            time.sleep(fault.seconds)

        # a store that ignores If-Match (s3rver, some gateways): the condition never reaches S3
        resp = self._forward(drop=("if-match",) if kind == "ignore_if_match" else ())
        if resp is None:
            return 502, 0
        try:
            return self._relay(resp, fault, head)
        except BaseException:
            # upstream response only partially consumed -> connection unusable
            self._close_upstream()
            raise

    def _forward(self, drop: tuple[str, ...] = ()) -> http.client.HTTPResponse | None:
        """Send the request upstream, without the headers named in ``drop`` (lower case);
        return the response (or answer 502)."""
        has_body = self._has_body()
        # Body-less requests may be retried once on a stale keep-alive
        # connection; requests with a (streamed) body always get a fresh one.
        attempts = 2 if (self._up is not None and not has_body) else 1
        if has_body or self._up is None:
            self._new_upstream()
        for attempt in range(attempts):
            conn = self._up
            try:
                if conn.sock is None:
                    conn.connect()
                    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                chunked = False
                for k, v in self.headers.items():
                    lk = k.lower()
                    if lk in HOP_BY_HOP or lk in drop:
                        continue
                    conn.putheader(k, v)
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    chunked = True
                    conn.putheader("Transfer-Encoding", "chunked")
                conn.endheaders()
                if has_body:
                    for piece in self._iter_request_body():
                        if chunked:
                            conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
                        else:
                            conn.send(piece)
                    if chunked:
                        conn.send(b"0\r\n\r\n")
                return conn.getresponse()
            except ClientGone:
                raise
            except (http.client.HTTPException, OSError) as e:
                self._new_upstream()
                if attempt + 1 < attempts:
                    continue
                with self.state.lock:
                    self.state.upstream_errors += 1
                if has_body:
                    self.close_connection = True  # request body state unknown
                body = error_xml("BadGateway", f"s3proxy: upstream error: {e!r}")
                self._send_simple(502, body, "application/xml", head=self.command == "HEAD")
                return None
        return None  # pragma: no cover

    def _relay(self, resp: http.client.HTTPResponse, fault: Fault | None, head: bool):
        kind = fault.kind if fault else None
        status = resp.status
        headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
        clen_hdr = resp.getheader("Content-Length")
        no_body = head or status in (204, 304) or 100 <= status < 200

        if kind in ("etag_form", "repeat_entries", "no_continuation"):
            if kind == "etag_form":
                headers = [(k, fault.reform(v) if k.lower() == "etag" else v)
                           for k, v in headers]
                headers = [(k, v) for k, v in headers if k.lower() != "etag" or v]
            if not no_body and "xml" in (resp.getheader("Content-Type") or ""):
                # a listing's ETags too (its body is read whole); none: no element at all
                def reform(m: re.Match) -> bytes:
                    e = fault.reform(html.unescape(m.group(1).decode()))
                    return b"<ETag>" + html.escape(e).encode() + b"</ETag>" if e else b""

                if kind == "etag_form":
                    body = re.sub(rb"<ETag>(.*?)</ETag>", reform, resp.read())
                elif kind == "repeat_entries":  # (names an entry twice: on two pages, or one)
                    body = re.sub(rb"(<(Contents|CommonPrefixes)>.*?</\2>)", rb"\1\1",
                                  resp.read(), flags=re.S)
                else:  # "there is more", with no token to ask for it
                    body = re.sub(rb"<NextContinuationToken>.*?</NextContinuationToken>", b"",
                                  resp.read(), flags=re.S).replace(
                        b"<IsTruncated>false</IsTruncated>", b"<IsTruncated>true</IsTruncated>")
                headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
                headers.append(("Content-Length", str(len(body))))
                if resp.will_close:
                    self._close_upstream()
                self.send_response_only(status, resp.reason)
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self._write(body)
                return status, len(body)

        if kind == "error_body_200" and not no_body:
            resp.read()  # drain upstream so its connection stays reusable
            if resp.will_close:
                self._close_upstream()
            body = error_xml("InternalError", "We encountered an internal error. Please try again.")
            self.send_response_only(status, resp.reason)
            for k, v in headers:
                if k.lower() not in ("content-length", "content-type"):
                    self.send_header(k, v)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self._write(body)
            return status, len(body)

        if no_body:
            self.send_response_only(status, resp.reason)
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            resp.read()
            if resp.will_close:
                self._close_upstream()
            return status, 0

        # Body of known length -> relay with the same Content-Length.
        # Unknown length (upstream chunked / read-until-close) -> re-chunk.
        if clen_hdr is not None:
            total = int(clen_hdr)
            chunked_out = False
            if kind == "extra_bytes":  # a body longer than the range, announced as such
                headers = [(k, str(total + fault.extra) if k.lower() == "content-length"
                            else v) for k, v in headers]
        elif kind in ("truncate", "stall_mid_body"):
            # need the length to find "half": buffer it
            data = resp.read()
            total = len(data)
            headers.append(("Content-Length", str(total)))
            resp = _BytesResp(data, resp)
            chunked_out = False
        else:
            total = None
            chunked_out = True

        self.send_response_only(status, resp.reason)
        for k, v in headers:
            self.send_header(k, v)
        if chunked_out:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        half = total // 2 if total is not None else None
        sent = 0
        stop_at = half if kind == "truncate" else None
        stalled = False
        while True:
            want = PIECE
            if stop_at is not None:
                want = min(want, stop_at - sent)
                if want <= 0:
                    break
            if kind == "stall_mid_body" and not stalled and half is not None:
                if sent >= half:
                    self.wfile.flush()
                    time.sleep(fault.seconds)
                    stalled = True
                else:
                    want = min(want, half - sent)
            piece = resp.read(want)
            if not piece:
                break
            if chunked_out:
                self._write(b"%x\r\n%s\r\n" % (len(piece), piece))
            else:
                self._write(piece)
            sent += len(piece)
        if kind == "stall_mid_body" and not stalled:  # empty/odd body
            self.wfile.flush()
            time.sleep(fault.seconds)

        if kind == "truncate":
            # Headers promised `total` bytes; we sent half: hang up.
            try:
                self.wfile.flush()
            except OSError:
                pass
            self.close_connection = True
            self._close_upstream()
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return status, sent

        if kind == "extra_bytes" and total is not None and sent == total:
            self._write(b"J" * fault.extra)
        if chunked_out:
            self._write(b"0\r\n\r\n")
        if total is not None and sent != total:
            # upstream itself short: cannot keep the client connection coherent
            self.close_connection = True
        if resp.will_close or (total is not None and sent != total):
            self._close_upstream()
        return status, sent


class _BytesResp:
    """Minimal stand-in for an HTTPResponse whose body was already buffered."""

    def __init__(self, data: bytes, orig: http.client.HTTPResponse):
        self._data = data
        self._pos = 0
        self.reason = orig.reason
        self.will_close = orig.will_close

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = len(self._data) - self._pos
        out = self._data[self._pos : self._pos + n]
        self._pos += len(out)
        return out


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512

    def handle_error(self, request, client_address):
        # Connection resets etc. are routine for a fault-injecting proxy.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, socket.timeout, ClientGone)):
            return
        super().handle_error(request, client_address)


def _watch_parent(parent_pid: int):
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen-port", type=int, default=0)
    ap.add_argument("--listen-host", default="127.0.0.1")
    ap.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:5000")
    ap.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="exit when this process is no longer our parent",
    )
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)

    up = urlsplit(args.upstream)
    if up.scheme != "http" or not up.hostname:
        ap.error("--upstream must be http://host:port")
    Handler.state = State()
    Handler.upstream_host = up.hostname
    Handler.upstream_port = up.port or 80
    Handler.verbose = args.verbose

    server = Server((args.listen_host, args.listen_port), Handler)
    port = server.server_address[1]
    if args.parent_pid:
        threading.Thread(target=_watch_parent, args=(args.parent_pid,), daemon=True).start()
    print(f"READY {port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
