"""S3 access: aiobotocore on trio (httpx backend), our own bounded retries.

Only read operations exist here (ListObjectsV2, HeadObject, HeadBucket, ranged
GetObject): nothing can write to S3.

Every ranged GET is validated before its bytes are trusted: status 206 (or 200
for a whole-object range), Content-Range naming exactly the requested range,
the ETag equal to the one the file was opened with (sent as If-Match too; some
servers ignore If-Match), and the body length equal to the range length.  A
response failing any check is a transient error and retried, so a truncated
body or an error document is never returned as data.

Ranged GETs skip botocore's per-call machinery once they can (``_DirectGet``):
botocore's parameter validation, serialisation, endpoint rules, event hooks and
response parsing cost about 2.5 ms of CPU per GET here, more than s3rver spends
serving a 100 KiB object.  The first GET of a store goes through botocore and
shows the way: a hook reads the URL it built and how it signed it.  Later GETs
build that URL for their key, are signed by botocore's own SigV4 signer with the
client's (refreshing) credentials, and go out on cachefs's own HTTP/1.1
connections (http1.py, with the TLS context the client built), or through the
client's HTTP session where a proxy is configured or ``[s3] own_connections`` is
false.  Anything unusual (another signature version, a URL that does not end with
the key) keeps botocore.

Retry budget: ``max_attempts`` attempts, each bounded by ``request_timeout``,
separated by full-jitter exponential backoff (base 0.1 s, cap 5 s; base 0.5 s when
S3 throttles: 503, 429, SlowDown).  With the defaults (6 attempts, 30 s) a read
fails with EIO after at most 6 × 30 s + 0.5+1+2+4+5 s ≈ 193 s when every attempt
stalls, after about 3 s when every attempt answers 500 at once, and after about
12.5 s (6 s on average) of SlowDown.  Waiting for one of the
``max_concurrency`` connection slots counts against the same budget.
"""

from __future__ import annotations

import logging
import os
import random
import re
import socket
import ssl
import time
from contextlib import AsyncExitStack
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import formatdate
from typing import Any
from urllib.parse import urlsplit

import aiobotocore.httpxsession
import aiobotocore.session
import botocore.exceptions
import botocore.utils
import httpx
import trio
from aiobotocore.config import AioConfig
from botocore.auth import _host_from_url
from botocore.awsrequest import AWSRequest
from botocore.utils import percent_encode

from . import http1
from .config import MountSpec, S3Options
from .errors import (
    EXIT_USAGE,
    NoSuchObject,
    ObjectChanged,
    QuietError,
    S3Error,
    chain,
    tls_failure,
)
from .stats import Stats
from .trace import current, span

log = logging.getLogger("cachefs.s3")

# httpcore receives a response body 64 KiB per call, each call a trip through h11, trio's
# socket layer and a timeout scope on the trio thread: an 8 MiB chunk took 128 of them
# and the trio thread was CPU-bound on cold reads (py-spy: 57% of its time).  Receiving
# up to 1 MiB per call lets the kernel hand over what it has buffered.
try:
    import httpcore._async.http11 as _http11

    _http11.AsyncHTTP11Connection.READ_NUM_BYTES = max(
        _http11.AsyncHTTP11Connection.READ_NUM_BYTES, 1 << 20)
except (ImportError, AttributeError):  # another httpcore: keep its default
    pass

# a refreshing credential provider (instance role, container role, credential_process,
# assume-role) that failed: the metadata service blinked, or the process failed
_CREDENTIAL_ERRORS = (botocore.exceptions.CredentialRetrievalError,
                      botocore.exceptions.MetadataRetrievalError,
                      botocore.exceptions.RefreshWithMFAUnsupportedError)


def _credential_failure(e: BaseException) -> str | None:
    """What went wrong fetching credentials, when ``e`` is such a failure."""
    if isinstance(e, _CREDENTIAL_ERRORS) or (
            isinstance(e, RuntimeError) and "credentials are still expired" in str(e)):
        return " ".join(str(e).split())
    return None


_TIMEOUTS = (trio.TooSlowError, TimeoutError, httpx.TimeoutException,
             botocore.exceptions.ConnectTimeoutError, botocore.exceptions.ReadTimeoutError)


def _why(e: BaseException) -> str:
    """What went wrong on the wire, in words ("connection refused", "timed out"), from
    ``e`` or what it wraps: trio's connect failure holds the errno in an exception group
    under its cause, botocore's and httpx's in their chains."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, _TIMEOUTS):
            return "timed out"
        if isinstance(x, ssl.SSLError):  # (an OSError whose errno 1 read "operation not
            return f"TLS: {tls_failure(x)}"  # permitted", which sent users after IAM)
        if isinstance(x, http1.ProtocolError) and str(x):
            return str(x)
        if isinstance(x, OSError) and x.strerror:
            # trio words its own ("error connecting to (host, port): ..."): the errno's
            why = (os.strerror(x.errno) if isinstance(x.errno, int) and x.errno > 0
                   and not isinstance(x, socket.gaierror) else x.strerror)
            return why[:1].lower() + why[1:]
        if isinstance(x, BaseExceptionGroup):
            todo += x.exceptions
        todo += [x.__cause__, x.__context__]
    if isinstance(e, httpx.HTTPError) and str(e):
        return str(e)
    return type(e).__name__


TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "503", "500", "502", "504", "RequestLimitExceeded",
}
# S3 asking for fewer requests: retried after longer waits (from THROTTLE_BASE seconds),
# which a burst of SlowDown outlasted with the usual 0.1 s base (a read gave up after
# about 1.5 s of it)
THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                  "503", "429", "TooManyRequests"}
THROTTLE_BASE = 0.5


def canonical_etag(etag: str | None) -> str:
    """An ETag as HTTP writes a strong one, ``"abc"``.  S3-compatible stores and the proxies
    before them differ: some list ETags without their quotes, some mark them weak (``W/``);
    cachefs keeps, compares and sends (If-Match) this one form only."""
    core = (etag or "").strip()
    if core[:2] in ("W/", "w/"):
        core = core[2:]
    core = core.strip('"')
    return f'"{core}"' if core else ""


@dataclass(frozen=True)
class ObjInfo:
    key: str
    size: int
    etag: str
    mtime: float


@dataclass
class Listing:
    prefixes: list[str]
    objects: list[ObjInfo]
    # monotonic and wall time its first page was asked for, when that was before the call
    # that returned it (it went on from the pages of an earlier call that failed part-way)
    asked: float | None = None
    asked_at: float | None = None


LIST_PAGE = int(os.environ.get("CACHEFS_TEST_LIST_PAGE") or 1000)  # keys a LIST page asks for
# The pages of a listing that failed part-way are kept this long, so the next listing of the
# prefix goes on from there: a directory of millions of keys takes minutes to list, and one
# that failed on a late page started again from page 1 at every lookup.
PARTIAL_KEEP = 900.0
PARTIALS = 4  # such listings kept at most (the oldest goes)


@dataclass
class _Partial:
    listing: Listing
    token: str
    pages: int
    asked: float  # monotonic and wall time its first page was asked for
    asked_at: float


async def _shrunk_is_changed(request):
    """Await a ranged GET of a range within the object's size as its listing gave it: a
    416 says the object is shorter now, replaced (by a store that ignores If-Match; S3
    answers 412 first). It was a plain EIO, and the next opens saw the old size again."""
    try:
        return await request
    except botocore.exceptions.ClientError as e:
        if int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0) == 416:
            raise ObjectChanged("object changed in S3 since it was opened (it is shorter)",
                                code="InvalidRange", status=412) from None
        raise


class _Retry(Exception):
    def __init__(self, msg: str, code: str = "", status: int = 0) -> None:
        super().__init__(msg)
        self.code = code
        self.status = status


def _timestamp(value: str) -> datetime:
    """An S3 timestamp: ISO 8601 in XML bodies ("2026-05-01T12:00:00.000Z", read by the
    stdlib), anything else (HTTP dates of HEAD answers) as botocore reads it."""
    try:
        t = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return botocore.utils.parse_timestamp(value)
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _mtime(v: object) -> float:
    if isinstance(v, datetime):
        return v.timestamp()
    return 0.0


def version_of(etag: str | None, size: int, mtime: float) -> str:
    """The version an object's chunks are cached and fetched under: its ETag.  A store
    that lists or heads an object without one gets ``~<size>-<LastModified, whole
    seconds>`` instead: with no version at all, the chunks of an overwritten object would
    be served for the new one.  (Whole seconds: a listing's LastModified may carry
    milliseconds, a HEAD's has none.)"""
    return canonical_etag(etag) or f"~{size}-{int(mtime)}"


def _made_up_mtime(version: str) -> int:
    """The LastModified (whole seconds) in a version version_of made up; 0 for an ETag."""
    return int(version.rpartition("-")[2]) if version.startswith("~") else 0


def _preconditions(version: str) -> dict[str, str]:
    """The headers that make a GET fail (412) unless the object is still ``version``:
    If-Match with an ETag, If-Unmodified-Since with the LastModified of a version made
    up for a store without ETags (version_of)."""
    if version.startswith('"'):
        return {"If-Match": version}
    mtime = _made_up_mtime(version)
    return {"If-Unmodified-Since": formatdate(mtime, usegmt=True)} if mtime > 0 else {}


def _botocore_preconditions(version: str) -> dict[str, Any]:
    """_preconditions as get_object's arguments."""
    if version.startswith('"'):
        return {"IfMatch": version}
    mtime = _made_up_mtime(version)
    return {"IfUnmodifiedSince": datetime.fromtimestamp(mtime, UTC)} if mtime > 0 else {}


_CR_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def _is_error_document(data: bytes | memoryview, content_type: str) -> bool:
    """An S3 XML error document served with a 2xx status (a broken proxy or gateway).

    Checked after the length check, so it only matters when the document happens to be
    exactly as long as the range.  An XML object whose chunk is itself exactly an
    <Error> document would be refused too: an accepted false positive.
    """
    if not content_type.startswith(("application/xml", "text/xml")) or len(data) > 16384:
        return False  # (S3's error documents are a few hundred bytes: a chunk of an XML
        # object is not copied on the trio thread to look)
    body = bytes(data).strip()
    if body.startswith(b"<?xml"):
        body = body[body.find(b"?>") + 2:].lstrip()
    return body.startswith(b"<Error>") and body.endswith(b"</Error>")


# the key a botocore GetObject is for, read by the hook that learns the direct path
_learning: ContextVar[str | None] = ContextVar("cachefs_s3_learning", default=None)
_XML_FIELD = {f: re.compile(rb"<%s>([^<]{0,512})</%s>" % (f.encode(), f.encode()))
              for f in ("Code", "Message")}


class _DirectGet:
    """A ranged GET without botocore's per-call machinery (see the module docstring)."""

    __slots__ = ("prefix", "suffix", "signing_name", "region", "user_agent", "signer",
                 "http", "pool", "origin_len")

    def __init__(self, prefix: str, suffix: str, signing_name: str, region: str,
                 user_agent: str, signer, http) -> None:
        self.prefix = prefix  # the URL up to the key
        self.suffix = suffix  # the query after it ("" or "?x-id=GetObject")
        self.signing_name = signing_name
        self.region = region
        self.user_agent = user_agent
        self.signer = signer  # the client's AioRequestSigner: credentials, refreshed
        self.http = http  # the client's HttpxSession
        self.pool: http1.Pool | None = None  # our own connections, where they can serve
        self.origin_len = 0  # len("scheme://host:port"): the rest of a URL is its target

    def use_own_connections(self, connect_timeout: float, max_idle: int, stats: Stats) -> bool:
        """Send GETs on ``http1`` connections when the client's session would reach the
        endpoint directly: http, or https with the SSLContext the session built (its
        verify setting, CA bundle, client certificate); never through a proxy."""
        u = urlsplit(self.prefix)
        proxies = getattr(self.http, "_proxy_urls", None)
        ctx = getattr(self.http, "_verify", None) if u.scheme == "https" else None
        if (proxies is None or u.scheme in proxies or u.scheme not in ("http", "https")
                or (u.scheme == "https" and not isinstance(ctx, ssl.SSLContext))
                or not u.hostname or u.username or u.password):
            return False
        self.pool = http1.Pool(u.scheme, u.hostname, u.port or (443 if ctx else 80),
                               _host_from_url(self.prefix), ctx, connect_timeout,
                               max_idle=max_idle, count=stats.inc)
        self.origin_len = len(f"{u.scheme}://{u.netloc}")
        return True

    @classmethod
    def learn(cls, client, key: str, request, signing_name: str, region_name: str,
              signature_version: str, request_signer) -> _DirectGet | None:
        """The direct path for a client, from the signing of its botocore GetObject for
        ``key``; None when that request was anything but a plain SigV4 GET of the key."""
        sc = request.context.get("signing") or {}
        if (signature_version != "s3v4" or request.method != "GET" or request.body
                or sc.get("request_credentials") or sc.get("identity_cache") is not None):
            return None
        http = getattr(getattr(client, "_endpoint", None), "http_session", None)
        if http is None or not hasattr(http, "send"):
            return None
        url, q, query = request.url.partition("?")
        enc = percent_encode(key, safe="/~")
        if not url.endswith("/" + enc):
            return None
        return cls(url[:-len(enc)], q + query, sc.get("signing_name") or signing_name,
                   sc.get("region") or region_name,
                   str(request.headers.get("User-Agent") or "cachefs"), request_signer,
                   http)

    async def sign(self, key: str, headers: dict[str, str]) -> AWSRequest:
        """The GET of ``key``, signed with the client's current credentials."""
        req = AWSRequest(method="GET",
                         url=self.prefix + percent_encode(key, safe="/~") + self.suffix,
                         headers={**headers, "User-Agent": self.user_agent})
        auth = await self.signer.get_auth_instance(signing_name=self.signing_name,
                                                   region_name=self.region,
                                                   signature_version="s3v4")
        auth.add_auth(req)
        return req

    async def send(self, req: AWSRequest):
        """Send a signed GET through the client's session; returns botocore's HTTP
        response (body not read yet)."""
        prepared = req.prepare()
        prepared.stream_output = True
        return await self.http.send(prepared)


def _ca_problem(e: BaseException) -> str:
    if isinstance(e, botocore.exceptions.InvalidConfigError):
        return "it is empty"
    if isinstance(e, ssl.SSLError):
        return "no PEM certificate in it"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


def _client_error(status: int, body: bytes) -> botocore.exceptions.ClientError:
    """A non-2xx answer to a direct GET as the error botocore would have raised."""
    code, msg = (m.group(1).decode("utf-8", "replace") if (m := _XML_FIELD[f].search(body))
                 else "" for f in ("Code", "Message"))
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code or str(status), "Message": msg},
         "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


# what S3 answers to keys it does not take (as opposed to AccessDenied: a policy's "no")
_CREDENTIAL_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                               "InvalidToken", "TokenRefreshRequired", "InvalidSecurity"})


class ObjectStore:
    """One bucket behind one endpoint."""

    def __init__(self, spec: MountSpec, opts: S3Options, stats: Stats) -> None:
        self.spec = spec
        self.bucket = spec.bucket
        self.opts = opts
        self.stats = stats
        self._stack = AsyncExitStack()
        self._client = None
        self._limiter = trio.CapacityLimiter(opts.max_concurrency)
        self._direct: _DirectGet | None = None
        self._partial: dict[str, _Partial] = {}  # prefix → a listing that failed part-way
        # the longest a request may take: every attempt timing out, and every backoff at
        # its cap (192.5 s with the defaults)
        self.budget = opts.max_attempts * opts.request_timeout + sum(
            min(opts.backoff_max, max(opts.backoff_base, THROTTLE_BASE) * 2 ** i)
            for i in range(opts.max_attempts - 1))

    async def __aenter__(self) -> ObjectStore:
        session = aiobotocore.session.AioSession(profile=self.spec.profile)
        cfg = AioConfig(
            http_session_cls=aiobotocore.httpxsession.HttpxSession,
            retries={"total_max_attempts": 1},  # retries are ours: counted, bounded, traced
            connect_timeout=self.opts.connect_timeout,
            read_timeout=self.opts.request_timeout,
            max_pool_connections=self.opts.max_concurrency,
            s3={"addressing_style": "path"} if self.spec.endpoint_url else None,
        )
        # The session's own default config decides how credentials are fetched: with
        # the httpx session class they refresh through anyio (instance roles, container
        # roles, credential_process), which runs on trio; with aiobotocore's default the
        # instance-role fetcher needs an asyncio loop and fails at mount on EC2.
        # LIST pages are parsed on the trio thread, most of it in dateutil reading the
        # timestamps: 59 ms a page of 1000 keys, 22 ms with ISO 8601 read by the stdlib
        session.get_component("response_parser_factory").set_parser_defaults(
            timestamp_parser=_timestamp)
        session.set_default_client_config(AioConfig(
            http_session_cls=aiobotocore.httpxsession.HttpxSession,
            connect_timeout=self.opts.connect_timeout))
        try:
            self._client = await self._stack.enter_async_context(session.create_client(
                "s3", endpoint_url=self.spec.endpoint_url, region_name=self.spec.region,
                config=cfg))
        except botocore.exceptions.ProfileNotFound as e:
            raise QuietError(f"AWS profile not found: {e}", EXIT_USAGE) from None
        except botocore.exceptions.PartialCredentialsError as e:
            # AWS_ACCESS_KEY_ID without AWS_SECRET_ACCESS_KEY, or a profile lacking one
            where = {"env": "the environment"}.get(e.kwargs.get("provider"),
                                                   e.kwargs.get("provider"))
            raise QuietError(f"incomplete AWS credentials in {where}: "
                             f"{e.kwargs.get('cred_var')} is missing", EXIT_USAGE) from None
        except (botocore.exceptions.InvalidConfigError, OSError) as e:
            ca = session.get_config_variable("ca_bundle")
            if ca is None:
                raise
            raise QuietError(f"the CA bundle {ca!r} (AWS_CA_BUNDLE, or ca_bundle in the "
                             f"profile) cannot be used: {_ca_problem(e)}") from None
        except ValueError as e:
            raise QuietError(f"invalid S3 endpoint {self.spec.endpoint_url!r}: {e}") from None
        except Exception as e:
            if (why := _credential_failure(e)) is None:
                raise
            raise QuietError(f"could not get AWS credentials: {why}") from None
        self._client.meta.events.register("before-sign.s3.GetObject", self._learn)
        return self

    def _learn(self, request=None, signing_name=None, region_name=None,
               signature_version=None, request_signer=None, **kw) -> None:
        key = _learning.get()
        if key is None or self._direct is not None or request is None:
            return
        try:
            self._direct = _DirectGet.learn(self._client, key, request, signing_name,
                                            region_name, signature_version, request_signer)
        except Exception as e:  # noqa: BLE001 - botocore stays the way
            log.debug("direct GETs unavailable: %s", e)
        if self._direct is not None:
            own = (self.opts.own_connections and self._direct.use_own_connections(
                self.opts.connect_timeout, self.opts.max_concurrency, self.stats))
            log.debug("ranged GETs of s3://%s go direct to %s… (%s)", self.bucket,
                      self._direct.prefix.split("?")[0][:80],
                      "own connections" if own else "the client's HTTP session")

    async def __aexit__(self, *exc: object) -> None:
        if self._direct is not None and self._direct.pool is not None:
            self._direct.pool.close()
        await self._stack.aclose()

    # -- retry machinery -------------------------------------------------------------

    def _classify(self, e: BaseException) -> BaseException:
        """Map an exception to _Retry (transient) or a final S3Error."""
        if isinstance(e, _Retry):
            return e
        if isinstance(e, botocore.exceptions.ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if status == 412 or code == "PreconditionFailed":
                return ObjectChanged("object changed in S3 since it was opened", code=code,
                                     status=412)
            if code == "NoSuchBucket":
                return S3Error(f"bucket {self.bucket!r} does not exist at "
                               f"{self.spec.endpoint_url or 'AWS'}", code=code, status=status)
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                return NoSuchObject("no such object", code=code, status=404)
            if status >= 500 or code in TRANSIENT_CODES or status in (408, 429):
                return _Retry(f"{status} {code}", code, status)
            return S3Error(f"{status} {code}: {err.get('Message', '')}".strip(" :"), code=code,
                           status=status)
        if (why := _credential_failure(e)) is not None:
            # retried like a 503: a refresh that fails for a second must not fail reads
            return _Retry(f"credential refresh failed: {why}", "Credentials")
        if isinstance(e, (botocore.exceptions.NoCredentialsError,
                          botocore.exceptions.PartialCredentialsError)):
            return S3Error("no AWS credentials found (set AWS_ACCESS_KEY_ID/"
                           "AWS_SECRET_ACCESS_KEY, a profile, or a credentials file)")
        if any(isinstance(x, ssl.SSLCertVerificationError) for x in chain(e)):
            # no retry makes a certificate trusted (a rotated one, an intercepting proxy)
            return S3Error(_why(e))
        if isinstance(e, (trio.TooSlowError, httpx.HTTPError, OSError,
                          botocore.exceptions.HTTPClientError,
                          botocore.exceptions.ConnectionError,
                          botocore.exceptions.ReadTimeoutError,
                          botocore.exceptions.ResponseStreamingError,
                          botocore.exceptions.IncompleteReadError)):
            return _Retry(_why(e))
        return e

    def _backoff(self, attempt: int, c: _Retry) -> float:
        """The wait before attempt ``attempt`` + 1: full jitter, from a larger base when S3
        throttles (its answers to quick retries are more of the same)."""
        base = self.opts.backoff_base
        if c.status in (429, 503) or c.code in THROTTLE_CODES:
            base = max(base, THROTTLE_BASE)
        return random.uniform(0, min(self.opts.backoff_max, base * 2 ** (attempt - 1)))

    async def _call(self, what: str, fn, *args):
        """Run ``fn`` with per-attempt timeout and jittered exponential backoff, all of it
        within ``budget``, the waits for a free connection slot included: while S3 does not
        answer, a read queued behind many others (read-ahead, prefetch, a preload) would
        otherwise wait in the queue before each of its attempts, many budgets in all."""
        deadline = trio.current_time() + self.budget
        attempt = 0
        while True:
            attempt += 1
            try:
                self._limiter.acquire_nowait()
                gave_up = False
            except trio.WouldBlock:
                # the daemon's own queue, not S3: its trace says so (the wait was counted
                # as the GET's, unexplained beside its ttfb and transfer)
                with span("s3.slot_wait", slots=self.opts.max_concurrency), \
                        trio.move_on_at(deadline) as queued:
                    await self._limiter.acquire()
                gave_up = queued.cancelled_caught
            if gave_up:
                self.stats.inc("s3_failures")
                log.warning("S3 %s s3://%s/…: no connection slot came free in %.0fs",
                            what, self.bucket, self.budget)
                raise S3Error(f"{what} failed: waited {self.budget:.0f}s for one of the "
                              f"{self.opts.max_concurrency} S3 connections (S3 is slow to "
                              "answer the requests ahead)", code="Timeout", transient=True)
            try:
                try:
                    with trio.fail_at(min(trio.current_time() + self.opts.request_timeout,
                                          deadline)):
                        return await fn(*args)
                finally:
                    self._limiter.release()
            except Exception as e:  # noqa: BLE001 - classified below
                c = self._classify(e)
                if not isinstance(c, _Retry):
                    if c is e:
                        raise
                    self.stats.inc("s3_errors")
                    raise c from None
                self.stats.inc("s3_errors")
                if attempt >= self.opts.max_attempts or trio.current_time() >= deadline:
                    self.stats.inc("s3_failures")
                    log.warning("S3 %s s3://%s/…: giving up after %d attempts (%s)", what,
                                self.bucket, attempt, c)
                    # no "S3" in front: its readers say where it comes from ("S3: …")
                    raise S3Error(f"{what} failed after {attempt} attempt"
                                  f"{'s' if attempt != 1 else ''}: {c}",
                                  code=c.code, status=c.status, transient=True) from None
                self.stats.inc("s3_retries")
                delay = self._backoff(attempt, c)
                log.debug("S3 %s retry %d in %.2fs (%s)", what, attempt, delay, c)
                with span("s3.backoff", attempt=attempt, reason=str(c)):
                    await trio.sleep(delay)

    # -- operations ------------------------------------------------------------------

    async def check(self) -> str | None:
        """Fail fast at mount: endpoint unreachable, bucket missing, bad credentials.
        Returns a warning when the prefix holds no object (a mistyped prefix mounts
        an empty tree)."""
        async def head_bucket():
            return await self._client.list_objects_v2(Bucket=self.bucket, MaxKeys=1,
                                                      Prefix=self.spec.prefix)
        if self.spec.endpoint_url:
            where = f"S3 endpoint {self.spec.endpoint_url}"
        else:  # botocore's endpoint for the region (or AWS_ENDPOINT_URL_S3), credentials cut
            u = urlsplit(getattr(self._client.meta, "endpoint_url", None) or "")
            host = u.netloc.rpartition("@")[2]
            where = "the default AWS S3 endpoint" + (f" ({u.scheme}://{host})" if host else "")
        try:
            r = await self._check_answered(head_bucket, where)
        except trio.TooSlowError:
            raise QuietError(f"{where} did not answer in time") from None
        except Exception as e:  # noqa: BLE001
            if (why := _credential_failure(e)) is not None:
                raise QuietError(f"could not get AWS credentials: {why}") from None
            c = self._classify(e)
            if (tls := tls_failure(e)) is not None:
                raise QuietError(f"TLS with {where} failed: {tls}"
                                 + (" (a private CA's certificate goes in AWS_CA_BUNDLE)"
                                    if "verify failed" in tls else "")) from None
            if isinstance(c, _Retry):
                if c.status:
                    raise QuietError(f"{where} answered {c.status} {c.code}") from None
                raise QuietError(f"{where} is unreachable ({c})") from None
            if isinstance(c, S3Error):
                if c.code in _CREDENTIAL_CODES:
                    raise QuietError(f"S3 refused the credentials for bucket {self.bucket!r} "
                                     f"({c.code})") from None
                if c.status == 403 or c.code == "AccessDenied":
                    # the credentials are good, the permission is missing (a policy with
                    # no s3:ListBucket): "refused the credentials" sent users after keys
                    raise QuietError(f"S3 denied listing bucket {self.bucket!r} "
                                     f"({c.code or c.status}): cachefs needs s3:ListBucket "
                                     "on it (and s3:GetObject on its objects)") from None
                if isinstance(c, NoSuchObject) and c.code != "NoSuchBucket":
                    # a listing has no object to miss: this is no S3 server (or the wrong
                    # path on one)
                    what = c.code if c.code and not c.code.isdigit() else "Not Found"
                    raise QuietError(f"{where} answered {c.status or 404} "
                                     f"{what} to a listing of bucket "
                                     f"{self.bucket!r}: is it an S3 endpoint?") from None
                if c.status and c.code != "NoSuchBucket":
                    raise QuietError(f"{where} answered {c}") from None
                raise QuietError(str(c)) from None
            raise
        if self.spec.prefix and not r.get("Contents") and not r.get("CommonPrefixes"):
            return (f"s3://{self.bucket}/{self.spec.prefix} holds no object (yet): the mount "
                    "is empty (a mistyped prefix?)")
        return None

    async def _check_answered(self, head_bucket, where: str):
        """The mount's first listing, retried while S3 answers that it is busy (5xx, 429,
        SlowDown): a fleet of nodes mounting at once met SlowDown, and each such mount
        failed. No answer, or any other answer, is final at once."""
        attempt = 0
        while True:
            attempt += 1
            try:
                with trio.fail_after(self.opts.connect_timeout + self.opts.request_timeout):
                    return await head_bucket()
            except Exception as e:  # noqa: BLE001 - classified by the caller
                c = self._classify(e)
                busy = isinstance(c, _Retry) and (c.status >= 500 or c.status == 429
                                                  or c.code in THROTTLE_CODES)
                if not busy or _credential_failure(e) is not None \
                        or attempt >= self.opts.max_attempts:
                    raise  # (a clock skew, RequestTimeTooSkewed: no retry mends it)
                delay = self._backoff(attempt, c)
                log.warning("%s answered %s %s to the mount's first listing: trying again "
                            "in %.1fs", where, c.status, c.code, delay)
                await trio.sleep(delay)

    async def list_dir(self, prefix: str) -> Listing:
        """All entries directly under ``prefix`` (all pages). When a page fails after the
        first, the pages so far are kept (PARTIAL_KEEP), and the next call for the prefix
        goes on from the failed page; its Listing says when its first page was asked for."""
        now = time.monotonic()
        for p in [p for p, v in self._partial.items() if v.asked + PARTIAL_KEEP <= now]:
            del self._partial[p]
        part = self._partial.pop(prefix, None)
        if part is None:
            out, token, pages, asked, asked_at = Listing([], []), None, 0, now, time.time()
        else:
            out, token, pages = part.listing, part.token, part.pages
            asked, asked_at = part.asked, part.asked_at
            self.stats.inc("s3_list_resumed")
            log.info("listing s3://%s/%s goes on from page %d, where it failed %.0f s ago",
                     self.bucket, prefix, pages + 1, now - asked)
        while True:
            kw = {"Bucket": self.bucket, "Prefix": prefix, "Delimiter": "/",
                  "MaxKeys": LIST_PAGE}
            if token:
                kw["ContinuationToken"] = token

            async def page(kw=kw):
                return await self._client.list_objects_v2(**kw)

            try:
                with span("s3.list", prefix=prefix, tier="s3"):
                    resp = await self._call("LIST", page)
            except S3Error as e:
                if part is not None and pages == part.pages and 400 <= e.status < 500 \
                        and e.status not in (401, 403) and not e.transient:
                    # the store refuses the kept continuation token: from page 1 again
                    log.info("listing s3://%s/%s: the store refused to go on from page "
                             "%d (%s); listing it from the start", self.bucket, prefix,
                             pages + 1, e)
                    return await self.list_dir(prefix)
                if pages and token:  # (kept 15 min from its first page, not from now)
                    self._keep_partial(prefix, _Partial(out, token, pages, asked, asked_at))
                raise
            self.stats.inc("s3_list_requests")
            pages += 1
            out.prefixes.extend(p["Prefix"] for p in resp.get("CommonPrefixes", []))
            for o in resp.get("Contents", []):
                size, mtime = int(o["Size"]), _mtime(o.get("LastModified"))
                out.objects.append(ObjInfo(o["Key"], size, version_of(o.get("ETag"), size, mtime),
                                           mtime))
            if not resp.get("IsTruncated"):
                if part is not None:  # as old as its first page, asked by an earlier call
                    out.asked, out.asked_at = asked, asked_at
                return out
            last, token = token, resp.get("NextContinuationToken")
            if not token or token == last:
                # the rest would be taken for deleted (or the same page asked for ever)
                raise S3Error(f"the listing of s3://{self.bucket}/{prefix} is cut short: the "
                              "store said there is more and gave "
                              + ("no continuation token" if not token else "the same token"),
                              code="BadListing")

    def _keep_partial(self, prefix: str, part: _Partial) -> None:
        self._partial[prefix] = part
        while len(self._partial) > PARTIALS:
            del self._partial[min(self._partial, key=lambda p: self._partial[p].asked)]
        n = len(part.listing.objects) + len(part.listing.prefixes)
        log.info("the listing of s3://%s/%s failed on page %d: the next one goes on from "
                 "there (%d entries kept)", self.bucket, prefix, part.pages + 1, n)

    async def head(self, key: str) -> ObjInfo:
        async def do():
            return await self._client.head_object(Bucket=self.bucket, Key=key)

        with span("s3.head", key=key, tier="s3"):
            r = await self._call("HEAD", do)
        self.stats.inc("s3_head_requests")
        size, mtime = int(r["ContentLength"]), _mtime(r.get("LastModified"))
        return ObjInfo(key, size, version_of(r.get("ETag"), size, mtime), mtime)

    def _count_direct(self) -> None:
        self.stats.inc("s3_get_requests")
        self.stats.inc("s3_get_direct")

    async def _get_direct(self, direct: _DirectGet, key: str, start: int, end: int,
                          etag: str, into: memoryview
                          ) -> tuple[int, Any, bytes | memoryview, int, float, float]:
        """One direct ranged GET: (status, headers, body, its length in bytes, the
        perf_counter time it was sent, seconds from then to the first byte).  Its signing
        is not S3's time: when it took a millisecond or more (credentials fetched again,
        from an instance role's metadata service, say), it goes on the ``s3.get`` span as
        ``sign_ms``.  The headers are case-insensitive (botocore's HTTPHeaders).
        ``into``: memory of the range's length the body is read into (a longer body is
        cut short there, and its length reported as one more).  The body is taken as
        sent, never decoded.  A non-2xx status raises the ClientError botocore would have
        raised, so _classify treats both ways alike; a 2xx is counted as soon as its
        headers arrive, as on botocore's way."""
        headers = {"Range": f"bytes={start}-{end}", **_preconditions(etag)}
        t_sign = time.perf_counter()
        req = await direct.sign(key, headers)
        t0 = time.perf_counter()
        if t0 - t_sign >= 0.001 and (sp := current()) is not None:
            sp.set(sign_ms=round((t0 - t_sign) * 1000, 3))
        if direct.pool is not None:
            status, hdrs, body, n, t_sent, t_head = await direct.pool.get(
                req.url[direct.origin_len:], req.headers.items(), into)
            if not 200 <= status < 300:
                raise _client_error(status, bytes(body))
            self._count_direct()
            # (a new connection is its own span, s3.connect: not S3's time to first byte)
            return status, hdrs, body, n, t_sent, t_head - t_sent
        r = await direct.send(req)
        ttfb = time.perf_counter() - t0
        ok = 200 <= r.status_code < 300
        if ok:
            self._count_direct()
        try:
            if ok:
                n, cap = 0, len(into)
                async for piece in r.raw.aiter_raw():
                    m = len(piece)
                    if n + m > cap:
                        n = cap + 1
                        break
                    into[n:n + m] = piece
                    n += m
                body = into  # its true length is n: one that is not cap is never used
            else:
                got = bytearray()
                async for piece in r.raw.aiter_raw():
                    got += piece
                    if len(got) > http1.MAX_ERROR_BODY:
                        del got[http1.MAX_ERROR_BODY:]
                        break
                body, n = bytes(got), len(got)
        finally:
            with trio.CancelScope(shield=True):
                await r.raw.aclose()  # a body not read to its end closes the connection
        if not ok:
            raise _client_error(r.status_code, bytes(body))
        return r.status_code, r.headers, body, n, t0, ttfb

    async def get_range(self, key: str, etag: str, start: int, length: int,
                        object_size: int, *, into: memoryview) -> bytes | memoryview:
        """Exactly ``length`` bytes at ``start`` of the version ``etag`` of ``key``,
        read into ``into`` (``length`` bytes of memory) and returned as it."""
        if length == 0:
            return b""
        end = start + length - 1
        with span("s3.get", key=key, offset=start, length=length, tier="s3") as sp:
            attempts = 0

            async def do():
                nonlocal attempts
                attempts += 1
                t0 = time.perf_counter()
                direct = self._direct
                if direct is not None:
                    status, hdr, data, got, t0, ttfb = await _shrunk_is_changed(
                        self._get_direct(direct, key, start, end, etag, into))
                    got_etag, content_range = hdr.get("etag"), hdr.get("content-range")
                    content_type = hdr.get("content-type")
                else:
                    token = _learning.set(key)
                    try:
                        r = await _shrunk_is_changed(self._client.get_object(
                            Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end}",
                            **_botocore_preconditions(etag)))
                    finally:
                        _learning.reset(token)
                    ttfb = time.perf_counter() - t0
                    self.stats.inc("s3_get_requests")
                    announced = r.get("ContentLength")
                    async with r["Body"] as body:
                        if isinstance(announced, int) and announced != length:
                            # not read: a gateway that ignores Range sent whole objects of
                            # GiBs, read into memory whole (and read(n) of aiobotocore's
                            # body copies it piece by piece, quadratic in its length)
                            data, got = b"", announced
                        else:
                            data = await body.read()
                            got = len(data)
                    if got == length:
                        into[:] = data
                        data = into
                    status = int(r.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
                    got_etag, content_range = r.get("ETag"), r.get("ContentRange")
                    content_type = r.get("ContentType")
                if got_etag is not None and etag.startswith('"') and got_etag != etag \
                        and canonical_etag(got_etag) != etag:
                    raise ObjectChanged("object changed in S3 since it was opened", status=412)
                if status == 206:
                    m = _CR_RE.match(content_range or "")
                    if m and m.group(3) != "*" and int(m.group(3)) != object_size:
                        # (what tells a store without ETags that an object was replaced
                        # within the second its LastModified names; first, because a
                        # range past a shorter object's end comes back cut at its end,
                        # which is no transient failure to retry)
                        raise ObjectChanged("object changed in S3 since it was opened",
                                            status=412)
                    if not m or int(m.group(1)) != start or int(m.group(2)) != end:
                        raise _Retry(f"bad Content-Range {content_range!r}")
                elif status == 200:
                    if start != 0 or length != object_size:
                        raise _Retry("200 for a partial range")
                else:
                    raise _Retry(f"unexpected status {status}", status=status)
                if got != length:
                    self.stats.inc("s3_short_bodies")
                    raise _Retry(f"body of {'over ' if got > length else ''}"
                                 f"{min(got, length)} bytes, not {length}")
                if _is_error_document(data, content_type or ""):
                    self.stats.inc("s3_error_bodies")
                    raise _Retry("an XML error document in a 2xx response")
                self.stats.inc("s3_bytes", len(data))
                sp.set(ttfb_ms=round(ttfb * 1000, 3),
                       transfer_ms=round((time.perf_counter() - t0 - ttfb) * 1000, 3),
                       bytes=len(data), status=status)
                return data

            try:
                data = await self._call("GET", do)
            finally:
                sp.set(attempts=attempts, retries=max(0, attempts - 1))
            return data
