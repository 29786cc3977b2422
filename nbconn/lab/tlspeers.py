"""TLS peers on loopback: a test CA made at run time, and servers that behave or misbehave on purpose.

Nothing secret is committed: :func:`test_pki` makes a CA, a server certificate signed by it, and a second
("rogue") CA with its own server certificate, every time, in a private temporary directory that is removed
on exit.  It uses the ``cryptography`` package when it is installed and the ``openssl`` binary otherwise
(keys: EC P-256, quick to make; certificates valid for two days).  The server certificates name
``localhost``, ``nbconn.test``, 127.0.0.1 and ::1.

==============  ==========================================================  ================================
peer            how it is made                                              nginx's handshake sees
==============  ==========================================================  ================================
tls_server      listen(), a thread per connection: SSL handshake with the   handshaked (TLS 1.3, or 1.2 if
                test CA's certificate, then wait for the client to close    ``version="1.2"``)
tls12_only      tls_server with TLS 1.2 as its highest version              TLS 1.2; a 1.3-only client fails
tls_untrusted   tls_server presenting the rogue CA's certificate            "certificate verify error"
tls_silent      accepts TCP and holds it, never reads the ClientHello       the connect timer fires
tls_hangup      reads the ClientHello, closes (FIN) without a word          "peer closed connection in SSL
                                                                            handshake"
tls_plaintext   reads the ClientHello, answers a plain HTTP 400             "SSL_do_handshake() failed (...
                                                                            wrong version number)"
==============  ==========================================================  ================================

Each is a context manager yielding a :class:`~nbconn.lab.peers.Peer` with, besides its counters,
``cafile`` (the CA a client must trust; for ``tls_untrusted`` too: it is the *good* CA, which did not sign
the certificate shown), ``handshakes`` (server handshakes completed), ``resumed`` (of which abbreviated:
the client offered a session and the server took it) and ``failed`` (server handshakes that failed).
Session resumption: TLS 1.3 by PSK from a ticket (the server sends two after the handshake, OpenSSL's
default); TLS 1.2 by ticket, or by session id when ``tickets=False`` (CPython gives every server context a
session id context, so OpenSSL's server-side session cache resumes by id).
Everything a peer opened (listener, connections, threads, the temporary directory) is closed on exit.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass

from .. import validate
from . import peers

#: The names in the server certificates' subjectAltName (DNS, then IP).
SERVER_NAMES = ("localhost", "nbconn.test")
SERVER_IPS = ("127.0.0.1", "::1")
TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_IO_TIMEOUT_S = 10.0  # a server connection waits at most this long for the client's next record or close
_OPENSSL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class PKI:
    """Paths of the run-time test CA and certificates (PEM), all inside ``directory``."""

    directory: str
    cafile: str  # the test CA: what a client trusts
    certfile: str  # server certificate signed by the test CA
    keyfile: str
    rogue_cafile: str  # a CA nobody trusts
    rogue_certfile: str  # server certificate signed by it
    rogue_keyfile: str
    made_with: str  # "cryptography" or "openssl"


def _have_cryptography() -> bool:
    try:
        import cryptography.x509  # noqa: F401
    except ImportError:
        return False
    return True


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _make_with_cryptography(directory: str, prefix: str) -> tuple[str, str, str]:
    """CA + server certificate with the cryptography package; returns (cafile, certfile, keyfile)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=2)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"nbconn {prefix} test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    san = [x509.DNSName(n) for n in SERVER_NAMES] + [x509.IPAddress(ipaddress.ip_address(a)) for a in SERVER_IPS]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAMES[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cafile, certfile, keyfile = (os.path.join(directory, f"{prefix}-{n}") for n in ("ca.pem", "server.pem",
                                                                                     "server.key"))
    with open(cafile, "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(certfile, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(keyfile, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    return cafile, certfile, keyfile


def _openssl(*args: str, cwd: str) -> None:
    """Run the openssl binary; a failure is a RuntimeError naming the command and openssl's last words."""
    try:
        done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, timeout=_OPENSSL_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise RuntimeError("making the test CA needs the `cryptography` package or the `openssl` binary; "
                           "neither is here") from None
    if done.returncode != 0:
        last = (done.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
        raise RuntimeError(f"openssl {args[0]} failed ({done.returncode}): {last}")


def _make_with_openssl(directory: str, prefix: str) -> tuple[str, str, str]:
    """CA + server certificate with the openssl binary; returns (cafile, certfile, keyfile)."""
    names = lambda n: os.path.join(directory, f"{prefix}-{n}")  # noqa: E731
    cafile, cakey, certfile, keyfile, csr, ext = (names(n) for n in ("ca.pem", "ca.key", "server.pem",
                                                                     "server.key", "server.csr", "server.ext"))
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", cakey, "-out", cafile, "-days", "2",
             "-subj", f"/CN=nbconn {prefix} test CA", "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
             "-addext", "keyUsage=critical,digitalSignature,keyCertSign,cRLSign", cwd=directory)
    _openssl("req", *ec, "-keyout", keyfile, "-out", csr, "-subj", f"/CN={SERVER_NAMES[0]}", cwd=directory)
    san = ",".join([f"DNS:{n}" for n in SERVER_NAMES] + [f"IP:{a}" for a in SERVER_IPS])
    with open(ext, "w") as f:
        f.write(f"basicConstraints=critical,CA:FALSE\nsubjectAltName={san}\nextendedKeyUsage=serverAuth\n"
                "authorityKeyIdentifier=keyid\n")
    _openssl("x509", "-req", "-in", csr, "-CA", cafile, "-CAkey", cakey, "-set_serial",
             str(int.from_bytes(os.urandom(8), "big")), "-days", "2", "-out", certfile, "-extfile", ext,
             cwd=directory)
    for path in (cakey, csr, ext):  # the CA key is needed no more: nobody can sign with it after this
        os.unlink(path)
    return cafile, certfile, keyfile


@contextlib.contextmanager
def test_pki(*, use: str | None = None):
    """A test CA, its server certificate, and a rogue CA with its own, in a temporary directory removed on exit.

    ``use``: "cryptography" or "openssl" to force one way (default: cryptography when installed).
    """
    if use is None:
        use = "cryptography" if _have_cryptography() else "openssl"
    validate.choice("use", use, ("cryptography", "openssl"))
    if use == "cryptography" and not _have_cryptography():
        raise RuntimeError("use='cryptography': the cryptography package is not installed")
    make = _make_with_cryptography if use == "cryptography" else _make_with_openssl
    directory = tempfile.mkdtemp(prefix="nbconn-pki-")
    try:
        good = make(directory, "lab")
        rogue = make(directory, "rogue")
        yield PKI(directory, *good, *rogue, made_with=use)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def server_context(pki: PKI, *, version: str | None = None, tickets: bool = True, rogue: bool = False
                   ) -> ssl.SSLContext:
    """The server side's SSL_CTX: the (rogue) server certificate, TLS 1.2 and 1.3 or only ``version``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # A client that closes without close_notify (nginx after a failed try, nbconn always) is a plain EOF, as
    # nginx's own servers treat it (SSL_OP_IGNORE_UNEXPECTED_EOF): otherwise OpenSSL raises a fatal alert on
    # it, and a fatal alert removes the session from the server's cache (TLS 1.2 by session id never resumes).
    ctx.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
    if version is not None:
        ctx.maximum_version = TLS_VERSIONS[version]
    if not tickets:
        ctx.options |= ssl.OP_NO_TICKET  # TLS 1.2: resumption by session id (server cache) instead
    if rogue:
        ctx.load_cert_chain(pki.rogue_certfile, pki.rogue_keyfile)
    else:
        ctx.load_cert_chain(pki.certfile, pki.keyfile)
    return ctx


class _Server:
    """Per accepted connection, a thread that runs the server's handshake and then waits for the client."""

    def __init__(self, ctx: ssl.SSLContext, peer: peers.Peer, http: bool = False, reset: bool = False) -> None:
        self.ctx, self.peer, self.http, self.reset = ctx, peer, http, reset
        self.lock = threading.Lock()
        self.live: list[ssl.SSLSocket] = []
        self.threads: list[threading.Thread] = []
        self.closing = False

    def handle(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(_IO_TIMEOUT_S)
            tls = self.ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        except BaseException:
            conn.close()
            raise
        with self.lock:
            if self.closing:
                tls.close()
                return
            self.live.append(tls)
            self.threads = list(filter(threading.Thread.is_alive, self.threads))  # (no comprehension in a with: see tests/test_interrupt_coverage.py)
            thread = threading.Thread(target=self._serve, args=(tls,), name="nbconn-tls-peer", daemon=True)
            self.threads.append(thread)
        thread.start()

    def _serve(self, tls: ssl.SSLSocket) -> None:
        peer = self.peer
        try:
            tls.do_handshake()
        except (OSError, ValueError):
            peer.failed += 1
        else:
            peer.handshakes += 1
            if tls.session_reused:
                peer.resumed += 1
            with contextlib.suppress(OSError, ValueError):
                if self.reset:
                    _read_request(tls)
                    # SO_LINGER {1, 0}: close() sends RST (the request was read: nothing else makes one)
                    tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, peers.LINGER_RESET)
                    return  # the finally below closes it, without SSL_shutdown
                if self.http:
                    _answer_http(tls)
                else:
                    tls.recv(1)  # until the client closes (or sends): bounded by _IO_TIMEOUT_S
            # SSL_shutdown before SSL_free, as a real server does: OpenSSL drops a session from the server's
            # cache when its connection is freed without one (ssl_clear_bad_session), and TLS 1.2 resumption
            # by session id would then never happen.  The client is usually gone: errors are expected.
            with contextlib.suppress(OSError, ValueError):
                tls.unwrap()
        finally:
            with self.lock:
                if tls in self.live:
                    self.live.remove(tls)
            tls.close()

    def close(self) -> None:
        with self.lock:
            self.closing = True
            live, threads = list(self.live), list(self.threads)
        for tls in live:
            with contextlib.suppress(OSError):
                tls.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in recv(); it then closes
        for thread in threads:
            thread.join(timeout=5)


#: what an ``http=True`` peer answers every request with (an HTTP/1.0 request, as nginx's proxy sends by default)
HTTP_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def _read_request(tls: ssl.SSLSocket) -> bool:
    """Read one request header (at most 64 KiB, each read bounded by _IO_TIMEOUT_S); False at end of file."""
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 65536:
        chunk = tls.recv(4096)
        if not chunk:
            return False
        data += chunk
    return True


def _answer_http(tls: ssl.SSLSocket) -> None:
    """Read one request header and answer HTTP_ANSWER."""
    if _read_request(tls):
        tls.sendall(HTTP_ANSWER)


class _TLSPeer(peers.Peer):
    """A Peer with the TLS counters (see the module docstring)."""

    cafile: str
    handshakes: int
    resumed: int
    failed: int


def _tls_peer(target: str, scenario: str, port, cafile: str) -> _TLSPeer:
    peer = _TLSPeer(target, scenario, port=port)
    peer.cafile = cafile
    peer.handshakes = peer.resumed = peer.failed = 0
    return peer


@contextlib.contextmanager
def _pki_for(pki: PKI | None):
    if pki is not None:
        if not isinstance(pki, PKI):
            raise TypeError(f"pki must be a PKI from test_pki(), got {validate.shown(pki)}")
        yield pki
    else:
        with test_pki() as made:
            yield made


@contextlib.contextmanager
def tls_server(host: str = "127.0.0.1", *, version: str | None = None, tickets: bool = True, pki: PKI | None = None,
               unix: bool = False, http: bool = False, reset: bool = False, _rogue: bool = False,
               _scenario: str = "tls_server"):
    """A TLS server on loopback with the test CA's certificate (TLS 1.2 and 1.3, or only up to ``version``).

    ``tickets=False``: no session tickets (TLS 1.2 then resumes by session id).  ``pki``: certificates from
    :func:`test_pki` to share between peers (default: made for this peer, removed on exit).  ``unix=True``:
    listen on an AF_UNIX path in a private temporary directory instead (connect() then returns 0).
    ``http=True``: after the handshake, read one HTTP request and answer ``200`` (:data:`HTTP_ANSWER`) -- a
    peer nginx's ``proxy_pass https://`` gets a response from; without it the peer waits for the client to close.
    ``reset=True``: after the handshake, read one request and close with SO_LINGER {1, 0} (an RST, no answer).
    """
    peers._check_loopback(host)
    if version is not None:
        validate.choice("version", version, tuple(TLS_VERSIONS))
    tickets = validate.flag("tickets", tickets)
    unix = validate.flag("unix", unix)
    http = validate.flag("http", http)
    reset = validate.flag("reset", reset)
    with _pki_for(pki) as pki, _listen(host, unix) as sock:
        ctx = server_context(pki, version=version, tickets=tickets, rogue=_rogue)
        target, port = peers._target_for(sock)
        peer = _tls_peer(target, _scenario, port, pki.cafile)
        server = _Server(ctx, peer, http, reset)
        try:
            with peers._Acceptor(sock, peer, server.handle):
                yield peer
        finally:
            server.close()


def tls12_only(host: str = "127.0.0.1", *, tickets: bool = True, pki: PKI | None = None, http: bool = False):
    """A TLS server that speaks TLS 1.2 at most: a client that insists on TLS 1.3 gets a protocol_version alert."""
    return tls_server(host, version="1.2", tickets=tickets, pki=pki, http=http, _scenario="tls12_only")


def tls_untrusted(host: str = "127.0.0.1", *, pki: PKI | None = None, http: bool = False):
    """A TLS server whose certificate was signed by a CA the client does not trust (``peer.cafile`` is the
    good test CA, which a client trusts: its verification then fails)."""
    return tls_server(host, pki=pki, http=http, _rogue=True, _scenario="tls_untrusted")


@contextlib.contextmanager
def _listen(host: str, unix: bool):
    """A listener: TCP on ``host``, or AF_UNIX in a private temporary directory (removed on exit)."""
    if not unix:
        with peers._listener(host, 4096) as sock:
            yield sock
        return
    with peers._unix_dir() as tmp, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(os.path.join(tmp, "tls.sock"))
        sock.listen(64)
        yield sock


@contextlib.contextmanager
def tls_silent(host: str = "127.0.0.1", *, pki: PKI | None = None, unix: bool = False):
    """Accepts the TCP connection and holds it, never reading: the ClientHello is never answered.

    The TCP handshake completes (the kernel does it), so nginx's connect succeeds and its SSL handshake
    waits for a ServerHello that never comes: only the connect timer ends it.  ``unix=True``: an AF_UNIX
    listener that never accepts: connect() returns 0 while the accept queue has room -- backlog + 1
    connections, 65 here, since the kernel refuses only when the queue is already *longer* than the backlog
    (net/unix/af_unix.c, unix_recvq_full_lockless; measured on Linux 6.18: listen(4) admitted 5).
    """
    unix = validate.flag("unix", unix)
    if unix:
        with _pki_for(pki) as pki, _listen(host, True) as sock:
            target, _ = peers._target_for(sock)
            yield _tls_peer(target, "tls_silent", None, pki.cafile)
        return
    with _pki_for(pki) as pki, peers.listening(host, hold=True) as plain:
        peer = _tls_peer(str(plain), "tls_silent", plain.port, pki.cafile)
        yield peer


def _read_hello_then(answer: bytes, delay_s: float = 0.0):
    """A handler for an accepted connection: read what the client sent first (its ClientHello; one read,
    bounded by _IO_TIMEOUT_S), wait ``delay_s``, write ``answer`` if any, and close.  Everything sent was read,
    so the close is a FIN, never an RST."""
    def handle(conn: socket.socket) -> None:
        try:
            conn.settimeout(_IO_TIMEOUT_S)
            hello = conn.recv(65536)
            if hello and delay_s:
                time.sleep(delay_s)  # bounded: a peer's own parameter, at most 1 s
            if hello and answer:
                conn.sendall(answer)
        except OSError:
            pass
        finally:
            conn.close()
    return handle


#: what tls_plaintext answers a ClientHello with: a plain HTTP server's complaint
PLAINTEXT_ANSWER = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


@contextlib.contextmanager
def _hello_peer(host: str, scenario: str, answer: bytes, delay_s: float = 0.0):
    peers._check_loopback(host)
    delay_s = validate.number("delay_s", delay_s, 0, 1.0)
    with peers._listener(host, 4096) as sock:
        target, port = peers._target_for(sock)
        peer = peers.Peer(target, scenario, port=port)
        with peers._Acceptor(sock, peer, _read_hello_then(answer, delay_s)):
            yield peer


def tls_hangup(host: str = "127.0.0.1"):
    """Accepts, reads the ClientHello and closes (FIN) without a word: nginx's SSL_do_handshake() meets EOF with
    no TLS alert and no OpenSSL error queued -- "peer closed connection in SSL handshake"."""
    return _hello_peer(host, "tls_hangup", b"")


def tls_plaintext(host: str = "127.0.0.1", *, delay_s: float = 0.0):
    """A plain HTTP server where TLS was expected (``proxy_pass https://`` to an http port): it reads the
    ClientHello and answers :data:`PLAINTEXT_ANSWER` -- not a TLS record: "SSL_do_handshake() failed (SSL: ...
    wrong version number)".  ``delay_s`` (at most 1 s): wait that long before answering, so that the client's
    first SSL_do_handshake() surely finds nothing to read and the failure comes on a later EPOLLIN."""
    return _hello_peer(host, "tls_plaintext", PLAINTEXT_ANSWER, delay_s)
