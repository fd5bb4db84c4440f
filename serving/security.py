"""TLS, mutual TLS and bearer-token auth for the gRPC runner and its clients.

Server (``serving.server`` wires it from ``ServeOptions``):

    sec = SecurityOptions(tls_cert="tls.crt", tls_key="tls.key", tls_client_ca="ca.crt",
                          auth_token_file="tokens")
    sec.check()                                   # OptionsError naming every bad file
    creds = server_credentials(sec)               # for server.add_secure_port; None without TLS
    interceptor = auth_interceptor(sec)           # TokenAuthInterceptor; None without a token file

Client: ``channel_credentials(ca, cert, key)`` and ``BearerTokenInterceptor(token)`` (what
``serving.client.Gpt2DeployClient`` uses); ``read_token(path)`` reads a client's token file.
A token file holds one token per line (several: all are accepted, for rotation); empty lines and
lines starting with ``#`` are ignored. The server re-reads the token file and the TLS files when
they change (rotation without a restart). Tokens are kept only as SHA-256 digests, compared in
constant time, and never logged.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from export.errors import OptionsError

log = logging.getLogger("serving.security")

HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICES = ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")
AUTH_METADATA = "authorization"
TOKEN_REQUIRED = 'a bearer token is required: send the metadata "authorization: Bearer <token>"'
TOKEN_REJECTED = "the bearer token was not accepted (" + TOKEN_REQUIRED + ")"
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")  # printable ASCII without spaces: a valid metadata value
_DENIAL_LOG_INTERVAL_S = 60.0


@dataclass(frozen=True)
class SecurityOptions:
    """Transport security and authentication of the server (the ``serve`` flags of the same names).

    Args:
        tls_cert: PEM certificate chain of the server; with ``tls_key`` turns TLS on.
        tls_key: PEM private key (unencrypted) of ``tls_cert``.
        tls_client_ca: PEM CA bundle; when set, clients must present a certificate it signed
            (mutual TLS). Needs ``tls_cert``/``tls_key``.
        auth_token_file: File of accepted bearer tokens (one per line); when set, every call
            needs ``authorization: Bearer <token>`` metadata, except health and reflection.
        auth_health: Require the token for ``grpc.health.v1.Health`` too (Kubernetes' native
            gRPC probes cannot send one).
        auth_reflection: Require the token for server reflection too.
    """

    tls_cert: Path | str | None = None
    tls_key: Path | str | None = None
    tls_client_ca: Path | str | None = None
    auth_token_file: Path | str | None = None
    auth_health: bool = False
    auth_reflection: bool = False

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None or self.tls_key is not None

    def open_services(self) -> tuple[str, ...]:
        """Services reachable without a token."""
        return (() if self.auth_health else (HEALTH_SERVICE,)) + (
            () if self.auth_reflection else REFLECTION_SERVICES
        )

    def describe(self) -> str:
        """One line for the startup log (paths and modes; never a token)."""
        transport = "plaintext"
        if self.tls:
            transport = "mutual TLS" if self.tls_client_ca else "TLS"
        if self.auth_token_file is None:
            return f"{transport}, no token auth"
        open_ = ", ".join(dict.fromkeys(s.rsplit(".", 1)[-1] for s in self.open_services())) or "nothing"
        return f"{transport}, bearer tokens from {self.auth_token_file} (open without a token: {open_})"

    def check(self) -> None:
        """Raise OptionsError listing every missing, unreadable, malformed or mismatched file."""
        problems: list[str] = []
        if (self.tls_cert is None) != (self.tls_key is None):
            have, need = ("tls_cert", "tls_key") if self.tls_key is None else ("tls_key", "tls_cert")
            problems.append(f"{have} needs {need} (a TLS server needs both its certificate and its key)")
        if self.tls_client_ca is not None and not self.tls:
            problems.append(
                "tls_client_ca needs tls_cert and tls_key (mutual TLS is TLS plus client certificates)"
            )
        for flag in ("auth_health", "auth_reflection"):
            if getattr(self, flag) and self.auth_token_file is None:
                problems.append(f"{flag} needs auth_token_file (there is no token to require)")
        problems.extend(self.tls_file_problems())
        if self.auth_token_file is not None:
            _parse_tokens("auth_token_file", self.auth_token_file, problems)
        if problems:
            raise OptionsError("invalid security options: " + "; ".join(problems))

    def tls_file_problems(self) -> list[str]:
        """What is wrong with the certificate, key and client CA files (each one named)."""
        problems: list[str] = []
        cert = _read_pem("tls_cert", self.tls_cert, "CERTIFICATE", problems)
        key = _read_pem("tls_key", self.tls_key, "PRIVATE KEY", problems)
        if cert is not None and key is not None:
            problems.extend(_check_key_pair(self.tls_cert, self.tls_key))
        if _read_pem("tls_client_ca", self.tls_client_ca, "CERTIFICATE", problems) is not None:
            try:
                ssl.create_default_context(cafile=str(self.tls_client_ca))
            except ssl.SSLError as e:
                problems.append(f"tls_client_ca {self.tls_client_ca}: not a usable CA bundle ({_reason(e)})")
        return problems


# --- files -----------------------------------------------------------------------------------------
def _read(what: str, path: Path | str, problems: list[str]) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        problems.append(f"{what} {path}: no such file")
    except IsADirectoryError:
        problems.append(f"{what} {path}: is a directory, not a file")
    except PermissionError:
        problems.append(f"{what} {path}: not readable (permission denied for uid {os.getuid()})")
    except OSError as e:
        problems.append(f"{what} {path}: cannot be read ({e.strerror or e})")
    return None


def _read_pem(what: str, path: Path | str | None, kind: str, problems: list[str]) -> bytes | None:
    """The file's bytes if it is a PEM file holding a ``kind`` block (CERTIFICATE, PRIVATE KEY)."""
    if path is None:
        return None
    data = _read(what, path, problems)
    if data is None:
        return None
    if kind == "PRIVATE KEY" and (b"ENCRYPTED PRIVATE KEY-----" in data or b"Proc-Type: 4,ENCRYPTED" in data):
        problems.append(
            f"{what} {path}: the key is encrypted; gRPC needs an unencrypted PEM key "
            f"(e.g. openssl pkey -in {path} -out key.pem)"
        )
        return None
    if not re.search(rb"-----BEGIN [A-Z0-9 ]*" + kind.encode() + rb"-----", data):
        problems.append(f"{what} {path}: not a PEM file with a {kind} block")
        return None
    return data


def _reason(e: ssl.SSLError) -> str:
    return e.reason or e.strerror or str(e)


def _check_key_pair(cert: Path | str | None, key: Path | str | None) -> list[str]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(cert), str(key), password=lambda: b"")  # never prompts on a tty
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e):
            return [f"tls_key {key} does not match the certificate in tls_cert {cert}"]
        return [f"tls_cert {cert} / tls_key {key}: cannot be loaded as a certificate and key ({_reason(e)})"]
    return []


def _parse_tokens(what: str, path: Path | str, problems: list[str]) -> list[str]:
    """The tokens of a token file; problems name the file and line, never a token."""
    data = _read(what, path, problems)
    if data is None:
        return []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        problems.append(f"{what} {path}: not UTF-8 text")
        return []
    tokens, bad = [], []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if _TOKEN_CHARS.fullmatch(line):
            tokens.append(line)
        else:
            bad.append(str(number))
    if bad:
        problems.append(
            f"{what} {path}: line(s) {', '.join(bad)} are not valid tokens (one token per line, "
            f"printable ASCII without spaces)"
        )
    elif not tokens:
        problems.append(f"{what} {path}: holds no token (one per line; empty lines, # comments ignored)")
    return tokens


def _read_tokens(path: Path | str, what: str) -> list[str]:
    """The tokens of a token file. Raises OptionsError naming its problems."""
    problems: list[str] = []
    tokens = _parse_tokens(what, path, problems)
    if problems:
        raise OptionsError("; ".join(problems))
    return tokens


def read_token(path: Path | str, what: str = "token_file") -> str:
    """The first token of a token file (what a client sends). Raises OptionsError."""
    return _read_tokens(path, what)[0]


def _digest(token: str | bytes) -> bytes:
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


class _Stamp(NamedTuple):
    dev: int
    ino: int
    size: int
    mtime_ns: int


def _stamp(path: Path) -> _Stamp | None:
    try:
        st = path.stat()  # follows symlinks: a Kubernetes Secret update swaps the ..data link
    except OSError:
        return None
    return _Stamp(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class TokenFile:
    """The tokens a server accepts, from a token file re-read when it changes.

    Args:
        path: The token file.
        reload_interval_s: The file is looked at (a ``stat``) at most this often; a change is
            re-read. A change that cannot be used (unreadable, empty, a bad line) keeps the
            previous tokens and logs a warning.

    Raises:
        OptionsError: the file cannot be used at construction.
    """

    def __init__(self, path: Path | str, reload_interval_s: float = 1.0):
        self.path = Path(path)
        self.reload_interval_s = reload_interval_s
        self._digests = tuple(_digest(t) for t in _read_tokens(self.path, "auth_token_file"))
        self._stamp = _stamp(self.path)
        self._checked = time.monotonic()

    def __len__(self) -> int:
        return len(self._digests)

    def accepts(self, token: str | bytes) -> bool:
        """True if ``token`` is one of the file's tokens (constant time in the token's content)."""
        self._maybe_reload()
        presented = _digest(token)
        ok = False
        for digest in self._digests:  # no early exit: every digest is compared
            ok |= hmac.compare_digest(presented, digest)
        return ok

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.reload_interval_s:
            return
        self._checked = now
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        problems: list[str] = []
        tokens = _parse_tokens("auth_token_file", self.path, problems)
        if problems:
            log.warning("%s; keeping the %d token(s) read before", "; ".join(problems), len(self._digests))
            return
        self._digests = tuple(_digest(t) for t in tokens)
        log.info("auth_token_file %s changed: %d token(s) accepted now", self.path, len(self._digests))


# --- server ----------------------------------------------------------------------------------------
class CertificateFiles:
    """The server's certificate, key and client CA, re-read for new connections when they change.

    Called by gRPC before each TLS handshake (from its own threads): returns a new
    configuration when a file changed and the new set is usable, else None (keep serving the
    current one; an unusable change is logged with every problem). Files are looked at (a
    ``stat``) at most every ``reload_interval_s``.
    """

    def __init__(self, opts: SecurityOptions, reload_interval_s: float = 1.0):
        self.opts = opts
        self.reload_interval_s = reload_interval_s
        self._lock = threading.Lock()
        self._stamps = self._stamp_all()
        self._checked = time.monotonic()

    def _paths(self) -> list[Path]:
        files = (self.opts.tls_cert, self.opts.tls_key, self.opts.tls_client_ca)
        return [Path(f) for f in files if f is not None]

    def _stamp_all(self) -> list[_Stamp | None]:
        return [_stamp(p) for p in self._paths()]

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        opts = self.opts
        cert, key = Path(str(opts.tls_cert)).read_bytes(), Path(str(opts.tls_key)).read_bytes()
        ca = Path(str(opts.tls_client_ca)).read_bytes() if opts.tls_client_ca is not None else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            with self._lock:
                now = time.monotonic()
                if now - self._checked < self.reload_interval_s:
                    return None
                self._checked = now
                stamps = self._stamp_all()
                if stamps == self._stamps:
                    return None
                self._stamps = stamps
                problems = self.opts.tls_file_problems()
                if problems:
                    log.warning(
                        "TLS files changed but cannot be used: %s; serving the ones read before",
                        "; ".join(problems),
                    )
                    return None
                config = self.configuration()
            log.info("TLS files changed: new connections get the new certificate")
            return config
        except Exception:  # gRPC's handshake thread must get an answer, not an exception
            log.exception("re-reading the TLS files failed; serving the ones read before")
            return None


def server_credentials(opts: SecurityOptions) -> grpc.ServerCredentials | None:
    """TLS credentials for ``add_secure_port`` (client certificates required with a client CA),
    re-read when the files change (``CertificateFiles``); None without TLS.
    Raises OptionsError for files that cannot be used."""
    if not opts.tls:
        return None
    opts.check()
    files = CertificateFiles(opts)
    return grpc.dynamic_ssl_server_credentials(
        files.configuration(), files, require_client_authentication=opts.tls_client_ca is not None
    )


def auth_interceptor(
    opts: SecurityOptions, on_denied: Callable[[str], None] | None = None
) -> TokenAuthInterceptor | None:
    """The token interceptor for ``opts``; None without a token file."""
    if opts.auth_token_file is None:
        return None
    return TokenAuthInterceptor(TokenFile(opts.auth_token_file), opts.open_services(), on_denied=on_denied)


def _bearer(metadata: Iterable[Any] | None) -> tuple[str | None, str]:
    """(token, "") from ``authorization: Bearer <token>`` metadata, else (None, why not)."""
    values = [v for k, v in (metadata or ()) if k == AUTH_METADATA]
    if not values:
        return None, "no authorization metadata"
    for value in values:
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip(), ""
    return None, "authorization metadata without a Bearer token"


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuse calls without an accepted bearer token with UNAUTHENTICATED, before any handler
    runs or any request message is read. Goes first in the server's interceptor list.

    Args:
        tokens: The accepted tokens.
        open_services: Full service names reachable without a token (health, reflection).
        on_denied: Called with the method name of each refused call (metrics).
    """

    def __init__(
        self,
        tokens: TokenFile,
        open_services: Iterable[str] = (),
        on_denied: Callable[[str], None] | None = None,
    ):
        self.tokens = tokens
        self.open_services = frozenset(open_services)
        self._on_denied = on_denied or (lambda method: None)
        self._denied_since_log = 0
        self._last_log = float("-inf")

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.lstrip("/").split("/", 1)[0] in self.open_services:
            return await continuation(handler_call_details)
        token, why = _bearer(handler_call_details.invocation_metadata)
        if token is not None:
            if self.tokens.accepts(token):
                return await continuation(handler_call_details)
            why = "bearer token not accepted"
        if await continuation(handler_call_details) is None:
            return None  # an unknown method stays UNIMPLEMENTED
        message = TOKEN_REQUIRED if token is None else TOKEN_REJECTED

        async def refuse(request_iterator, context: grpc.aio.ServicerContext) -> None:
            self._note(method, why, context.peer())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        # A stream-stream handler whatever the method's kind: it runs before any request message
        # is read, so an unauthenticated caller gets nothing parsed.
        return grpc.stream_stream_rpc_method_handler(refuse)

    def _note(self, method: str, why: str, peer: str) -> None:
        self._on_denied(method)
        self._denied_since_log += 1
        log.debug("refused %s from %s: %s", method, peer, why)
        now = time.monotonic()
        if now - self._last_log >= _DENIAL_LOG_INTERVAL_S:
            log.warning(
                "refused %d unauthenticated call(s) since the last report; latest: %s from %s (%s)",
                self._denied_since_log,
                method,
                peer,
                why,
            )
            self._denied_since_log, self._last_log = 0, now


# --- client ----------------------------------------------------------------------------------------
def channel_credentials(
    ca: Path | str | None = None, cert: Path | str | None = None, key: Path | str | None = None
) -> grpc.ChannelCredentials:
    """TLS channel credentials: trust ``ca`` (the system's roots when None) and, for mutual TLS,
    present ``cert``/``key``. Raises OptionsError naming every file that cannot be used."""
    problems: list[str] = []
    if (cert is None) != (key is None):
        problems.append("tls_cert and tls_key go together (a client certificate needs its key)")
    root = _read_pem("tls_ca", ca, "CERTIFICATE", problems)
    chain = _read_pem("tls_cert", cert, "CERTIFICATE", problems)
    private = _read_pem("tls_key", key, "PRIVATE KEY", problems)
    if chain is not None and private is not None:
        problems.extend(_check_key_pair(cert, key))
    if problems:
        raise OptionsError("invalid client TLS options: " + "; ".join(problems))
    return grpc.ssl_channel_credentials(root_certificates=root, private_key=private, certificate_chain=chain)


class _CallDetails(
    collections.namedtuple("_CallDetails", "method timeout metadata credentials wait_for_ready compression"),
    grpc.ClientCallDetails,
):
    pass


class BearerTokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Add ``authorization: Bearer <token>`` to every call of a channel (plaintext or TLS)."""

    def __init__(self, token: str):
        if not _TOKEN_CHARS.fullmatch(token):
            raise OptionsError("a token is printable ASCII without spaces")
        self._header = (AUTH_METADATA, f"Bearer {token}")

    def _details(self, d):
        metadata = [m for m in (d.metadata or ()) if m[0] != AUTH_METADATA] + [self._header]
        return _CallDetails(
            d.method,
            d.timeout,
            metadata,
            d.credentials,
            getattr(d, "wait_for_ready", None),
            getattr(d, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)
