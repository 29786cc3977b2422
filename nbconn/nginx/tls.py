"""The second handshake: the upstream TLS handshake, on the connect's own socket and epoll loop, as nginx runs it.

For ``proxy_pass https://...`` nginx 1.22.1 does not write the request when the connect is decided: it
runs an SSL handshake first.  Read this module next to src/http/ngx_http_upstream.c
(``ngx_http_upstream_connect``, ``ngx_http_upstream_ssl_init_connection``,
``ngx_http_upstream_ssl_handshake_handler``, ``ngx_http_upstream_ssl_handshake``) and
src/event/ngx_event_openssl.c (``ngx_ssl_handshake``, ``ngx_ssl_handshake_handler``,
``ngx_ssl_connection_error``), tag release-1.22.1; line numbers below are that tag's.

The steps, in nginx's order
---------------------------
1. The connect is decided NGX_OK (:mod:`nbconn.flow`, unchanged).  The handler that reads SO_ERROR is
   ``ngx_http_upstream_ssl_init_connection``: it calls ``ngx_http_upstream_test_connect`` first (line
   1675), reached straight from ``ngx_http_upstream_connect`` when connect() returned 0 (line 1656) or from
   ``ngx_http_upstream_send_request_handler`` on EPOLLOUT (line 2312).  A failure there is the connect's
   ("connect() failed ... while connecting to upstream").  When the connect's wake-up also carries EPOLLIN,
   the read handler ``ngx_http_upstream_process_header`` runs first (ngx_epoll_process_events): it reads
   SO_ERROR itself, then makes a plain recv() -- before any ClientHello.  With a peer that speaks TLS nothing
   is there (EAGAIN) and the write handler goes on as above; a peer that closed at once makes nginx log
   "upstream prematurely closed connection while reading response header from upstream" (FT_ERROR, counted,
   as "peer closed connection in SSL handshake" would be).  That is a race in nginx (the nginx review: 7 of
   20 requests); nbconn always starts the handshake, so it writes the second line (docs/claims.md).
2. ``ngx_ssl_create_connection``: SSL_new() and SSL_set_fd() on the same descriptor, client state
   (ngx_event_openssl.c lines 1621-1673); the server name (``proxy_ssl_server_name``) and, with
   ``proxy_ssl_session_reuse`` (on by default), the peer's saved session (``SSL_set_session``) and
   TCP_NODELAY, "abbreviated SSL handshake may interact badly with Nagle" (ngx_http_upstream.c lines
   1706-1724; ``ngx_tcp_nodelay`` leaves AF_UNIX alone).  Here: ``SSLContext.wrap_socket`` on the
   connected socket -- CPython's _ssl module also calls SSL_set_fd, so the handshake's read() and write()
   are OpenSSL's own, as nginx's are.  The wrap itself costs CPython a few calls nginx does not make
   (getsockopt(SO_TYPE), getsockname, getpeername, ioctl(FIONBIO)), and every do_handshake() one more
   ioctl(FIONBIO) (CPython sets the BIO's blocking mode before each call); the trace says so at the wrap.
   nginx's SSL_CTX settings that show in the syscalls are copied: read-ahead (``SSL_CTX_set_read_ahead``,
   ngx_event_openssl.c line 390: one read() of up to a buffer, not a 5-byte header and then the record),
   ``proxy_ssl_ciphers`` DEFAULT, and ``proxy_ssl_protocols``' default, which stops at TLS 1.2.
3. The log action becomes "SSL handshaking to upstream" (line 1727) and ``ngx_ssl_handshake`` runs
   ``SSL_do_handshake()`` (ngx_event_openssl.c line 1733).  SSL_ERROR_WANT_READ / SSL_ERROR_WANT_WRITE
   return NGX_AGAIN to the event loop with ``ngx_ssl_handshake_handler`` on both events (lines 1803-1831):
   with edge-triggered epoll and the registration made before connect() nothing is re-registered, and any
   event -- read or write -- calls SSL_do_handshake() again.  A report with both EPOLLIN and EPOLLOUT (the
   usual one: the server's flight arrived, and the socket is writable) runs the read handler and then the
   write handler (ngx_epoll_process_events, ngx_epoll_module.c lines 883-930): two calls, the second usually
   finding WANT_READ again -- unless the first decided: SSL_do_handshake() = 1 makes both handlers
   ngx_http_upstream_handler (ngx_http_upstream_ssl_handshake, lines 1799-1802) and a failure closes the
   connection (the write event is then stale), so no second handshake call follows.
   Here: ``SSLSocket.do_handshake()`` on the non-blocking socket, ``SSLWantReadError`` /
   ``SSLWantWriteError`` back to :class:`nbconn.loop.Loop`; each call and each wait is a trace step.
4. The timer.  After NGX_AGAIN, ``ngx_http_upstream_ssl_init_connection`` arms
   ``proxy_connect_timeout`` on the write event *only if no timer is set* (lines 1731-1735).  When
   connect() needed EPOLLOUT (NGX_AGAIN), ``ngx_http_upstream_connect`` armed that timer at connect()
   (line 1649) and nothing deleted it: the handshake gets **what is left of it**, so
   proxy_connect_timeout bounds connect and handshake together.  When connect() returned 0 (NGX_OK: an
   AF_UNIX peer) no timer was set: the handshake gets **a fresh one**.  When it fires,
   ``ngx_ssl_handshake_handler`` sees ``ev->timedout`` (line 2071) and the upstream's handler
   ``ngx_http_upstream_ssl_handshake`` calls ``ngx_http_upstream_next(NGX_HTTP_UPSTREAM_FT_TIMEOUT)``
   (line 1808), which logs "upstream timed out (110: Connection timed out)" at ERR (line 4306).
5. The decision (:func:`handshake_verdict`, a pure table):

   - SSL_do_handshake() = 1: NGX_OK.  With ``proxy_ssl_verify on``, nginx then checks
     ``SSL_get_verify_result`` and the name (lines 1776-1792): "upstream SSL certificate verify error:
     (N:text)" or "upstream SSL certificate does not match "name"", ERR, next upstream FT_ERROR.
     nginx's client SSL_CTX verifies with SSL_VERIFY_NONE and a callback that accepts everything, so *its*
     handshake completes (the client Finished is written) and the check comes after, with
     ``proxy_ssl_verify_depth`` 1.  nbconn does the same: CERT_NONE with the CA loaded, then the same two
     calls through ctypes (:class:`_OpenSSL`; ``TLSClient.verify_like == "nginx"``).  Where that cannot run,
     CPython's ``CERT_REQUIRED`` makes OpenSSL stop inside SSL_do_handshake and send an alert
     (``verify_like == "cpython"``): the same kind of verdict, but OpenSSL's *first* error (20 where nginx,
     whose callback lets verification go on, logs the last one, 21) and an alert written instead of Finished.
   - SSL_ERROR_SSL: "SSL_do_handshake() failed (SSL: error:...)" via ``ngx_ssl_connection_error``
     (lines 3298-3466): ERR for the handshake-failure reasons listed there (an alert from the peer, a
     version mismatch...) as upstream connections log at NGX_ERROR_ERR, CRIT for any other reason.
     A handshake that did not complete is closed with nothing sent: ngx_ssl_shutdown returns at once while
     ``SSL_in_init``.  A completed one (a certificate check failed) gets a close_notify, not waited for, when
     this was the last try (ngx_http_upstream_finalize_request, line 4502), nothing when the next peer
     follows (ngx_http_upstream_next, lines 4413-4416): ``connect_tls(last_try=)``.
   - the peer closed (or reset) before the handshake ended and OpenSSL queued no error: "peer closed
     connection in SSL handshake" via ``ngx_connection_error`` (lines 1838-1845): ERR for 0, ECONNRESET
     and the other errnos of its list, else ALERT.  nginx sets SSL_OP_IGNORE_UNEXPECTED_EOF (line 379),
     and so does :class:`TLSClient`, so an EOF is this line, not "unexpected eof while reading".
   - All failures: next upstream NGX_HTTP_UPSTREAM_FT_ERROR (line 1814), the timer FT_TIMEOUT.

6. Session reuse (``proxy_ssl_session_reuse``): nginx keeps one session per peer
   (``u->peer.set_session`` / ``save_session``), saved by OpenSSL's new-session callback when a session
   arrives (ngx_event_openssl.c line 1602): at the end of a TLS 1.2 handshake, or, in TLS 1.3, when the
   NewSessionTicket arrives *after* it -- nginx reads it with the response.  Here a handshake that will
   save its session reads on (SSL_read, on the same loop and timer) until the ticket is there.  The next
   handshake to that peer offers it; ``TLSResult.resumed`` says whether the server took it
   (``SSL_session_reused``).  The verdict and ``handshake_ns`` are those of SSL_do_handshake() = 1; only the
   socket's close waits for the ticket, at most until the timer (a TLS 1.3 server that sends no ticket keeps
   it that long, and ``session_saved`` stays False).

``nginx_exact``: the connect makes exactly nginx's syscalls (:mod:`nbconn.flow`) and the timers keep nginx's
cached clock; the TLS part then adds only CPython's calls named in step 2, and ends where nginx would go on
to ``ngx_http_upstream_send_request`` (getsockopt(SO_ERROR), then the request): there nbconn closes the
socket, with a close_notify for a last try (nginx sends it only when it finalizes the request, later).  tests/test_tls.py compares the
records written and read with a real nginx 1.22.1 worker's (success, untrusted certificate, timeout, version
mismatch, session reuse).

The upstream model (:func:`nbconn.nginx.upstream.run_request` with ``tls=``) runs each try through
:func:`connect_tls` with ``keep=True`` -- a completed handshake's socket then carries the request -- and takes
its verdict from here; nbconn.nginx.why reads these lines back with the same table (tests/test_upstream_tls.py,
tests/test_why_tls.py).
"""

from __future__ import annotations

import encodings.idna  # noqa: F401 -- wrap_socket encodes the server name: not imported inside a trace
import errno as _errno
import os
import re
import socket
import ssl
import time
from collections import namedtuple
from dataclasses import dataclass, field, replace

from .. import validate
from ..errors import (CONNECTED, NGX_CONNECTION_ERROR_ERR_ERRNOS, NGX_ERROR, NGX_HTTP_UPSTREAM_FT_ERROR,
                      NGX_HTTP_UPSTREAM_FT_TIMEOUT, NGX_LOG_ALERT, NGX_LOG_CRIT, NGX_LOG_ERR, NGX_OK, errno_name,
                      strerror)
from ..flow import DONE, Attempt, make_plan
from ..loop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, Loop, event_names
from ..result import Result
from ..settings import Settings, given
from ..strace import c_escape, format_ns
from ..targets import parse_target

_monotonic_ns = time.monotonic_ns

#: The handler whose ngx_http_upstream_test_connect reads SO_ERROR for an https upstream (line 1675).
SSL_INIT_CONNECTION = "ngx_http_upstream_ssl_init_connection"
#: ``r->connection->log->action`` during the handshake (ngx_http_upstream.c line 1727)
ACTION = "SSL handshaking to upstream"
_TAIL = f" while {ACTION}"

TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
#: proxy_ssl_verify_depth's default (ngx_http_proxy_module.c lines 3739-3740)
NGX_VERIFY_DEPTH = 1

# -- outcomes of the handshake (the connect's own words stay those of nbconn.errors) ----------------------
HANDSHAKED = "handshaked"
TLS_TIMED_OUT = "timed_out"
UNTRUSTED = "untrusted"  # the certificate check failed (chain or name)
TLS_FAILED = "tls_failed"  # SSL_do_handshake() failed (an alert, no common version...)
PEER_CLOSED = "peer_closed"  # EOF or RST before the handshake ended
TLS_OUTCOMES = (HANDSHAKED, TLS_TIMED_OUT, UNTRUSTED, TLS_FAILED, PEER_CLOSED)

#: OpenSSL 3 error reasons (ssl/sslerr.h): name -> number.  The ones nginx 1.22.1's ngx_ssl_connection_error
#: logs at ERR for an upstream (ngx_event_openssl.c lines 3337-3450: "handshake failures"), by the numbers
#: its comments give; alerts received are 1000 + the alert number (SSL_AD_REASON_OFFSET).
NGX_SSL_HANDSHAKE_FAILURE_REASONS = {
    "BAD_CHANGE_CIPHER_SPEC": 103, "NO_SUITABLE_KEY_SHARE": 101, "NO_SUITABLE_SIGNATURE_ALGORITHM": 118,
    "BLOCK_CIPHER_PAD_IS_WRONG": 129, "DIGEST_CHECK_FAILED": 149, "ERROR_IN_RECEIVED_CIPHER_LIST": 151,
    "EXCESSIVE_MESSAGE_SIZE": 152, "HTTPS_PROXY_REQUEST": 155, "HTTP_REQUEST": 156, "LENGTH_MISMATCH": 159,
    "NO_CIPHERS_PASSED": 182, "NO_CIPHERS_SPECIFIED": 183, "NO_COMPRESSION_SPECIFIED": 187,
    "NO_SHARED_CIPHER": 193, "RECORD_LENGTH_MISMATCH": 213, "CLIENTHELLO_TLSEXT": 226, "PARSE_TLSEXT": 227,
    "CALLBACK_FAILED": 234, "NO_APPLICATION_PROTOCOL": 235, "UNEXPECTED_MESSAGE": 244,
    "UNEXPECTED_RECORD": 245, "UNKNOWN_ALERT_TYPE": 246, "UNKNOWN_PROTOCOL": 252,
    "NO_COMMON_SIGNATURE_ALGORITHMS": 253, "UNSUPPORTED_PROTOCOL": 258, "NO_SHARED_GROUP": 266,
    "WRONG_VERSION_NUMBER": 267, "DECRYPTION_FAILED_OR_BAD_RECORD_MAC": 281, "RENEGOTIATE_EXT_TOO_LONG": 335,
    "RENEGOTIATION_ENCODING_ERR": 336, "RENEGOTIATION_MISMATCH": 337,
    "UNSAFE_LEGACY_RENEGOTIATION_DISABLED": 338, "SCSV_RECEIVED_WHEN_RENEGOTIATING": 345,
    "INAPPROPRIATE_FALLBACK": 373, "CERT_CB_ERROR": 377, "VERSION_TOO_LOW": 396,
    "SSLV3_ALERT_CLOSE_NOTIFY": 1000, "SSLV3_ALERT_UNEXPECTED_MESSAGE": 1010, "SSLV3_ALERT_BAD_RECORD_MAC": 1020,
    "TLSV1_ALERT_DECRYPTION_FAILED": 1021, "TLSV1_ALERT_RECORD_OVERFLOW": 1022,
    "SSLV3_ALERT_DECOMPRESSION_FAILURE": 1030, "SSLV3_ALERT_HANDSHAKE_FAILURE": 1040,
    "SSLV3_ALERT_NO_CERTIFICATE": 1041, "SSLV3_ALERT_BAD_CERTIFICATE": 1042,
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": 1043, "SSLV3_ALERT_CERTIFICATE_REVOKED": 1044,
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": 1045, "SSLV3_ALERT_CERTIFICATE_UNKNOWN": 1046,
    "SSLV3_ALERT_ILLEGAL_PARAMETER": 1047, "TLSV1_ALERT_UNKNOWN_CA": 1048, "TLSV1_ALERT_ACCESS_DENIED": 1049,
    "TLSV1_ALERT_DECODE_ERROR": 1050, "TLSV1_ALERT_DECRYPT_ERROR": 1051, "TLSV1_ALERT_EXPORT_RESTRICTION": 1060,
    "TLSV1_ALERT_PROTOCOL_VERSION": 1070, "TLSV1_ALERT_INSUFFICIENT_SECURITY": 1071,
    "TLSV1_ALERT_INTERNAL_ERROR": 1080, "TLSV1_ALERT_USER_CANCELLED": 1090, "TLSV1_ALERT_NO_RENEGOTIATION": 1100,
}
#: Other reasons a handshake meets, with their OpenSSL 3 numbers, logged at CRIT by nginx.
OTHER_SSL_REASONS = {"CERTIFICATE_VERIFY_FAILED": 134, "PACKET_LENGTH_TOO_LONG": 198,
                     "UNEXPECTED_EOF_WHILE_READING": 294, "RECORD_LAYER_FAILURE": 313,
                     "TLSV1_ALERT_NO_APPLICATION_PROTOCOL": 1120, "TLSV13_ALERT_MISSING_EXTENSION": 1109,
                     "TLSV1_UNRECOGNIZED_NAME": 1112, "TLSV13_ALERT_CERTIFICATE_REQUIRED": 1116}
_ERR_LIB_SSL = 20  # OpenSSL 3 packs an error code as lib << 23 | reason (ERR_PACK): SSL routines = 0x0A000000
#: number -> name, for reading a logged code back (nbconn.nginx.why: "error:0A00042E" -> TLSV1_ALERT_PROTOCOL_VERSION)
SSL_REASON_NAMES = {number: name for name, number in {**NGX_SSL_HANDSHAKE_FAILURE_REASONS,
                                                       **OTHER_SSL_REASONS}.items()}


def reason_of_code(code: str) -> str | None:
    """The reason name of an OpenSSL 3 error code as nginx logs it (``0A00042E``), or None when it is not an
    SSL-library code this module knows (the inverse of :func:`openssl_error_string`)."""
    try:
        number = int(code, 16)
    except ValueError:
        return None
    if number >> 23 != _ERR_LIB_SSL:
        return None
    return SSL_REASON_NAMES.get(number & ((1 << 23) - 1))
_X509_V_ERR_HOSTNAME_MISMATCH = 62


def openssl_error_string(reason: str, text: str) -> str:
    """What ERR_error_string_n() gives for an SSL-library reason, as nginx's ngx_ssl_error appends it:
    ``error:0A00042E:SSL routines::tlsv1 alert protocol version:SSL alert number 70``.  ``reason``: the
    name (``TLSV1_ALERT_PROTOCOL_VERSION``), ``text``: OpenSSL's reason string.  A reason whose number this
    module does not know shows ``error:0A??????``."""
    number = NGX_SSL_HANDSHAKE_FAILURE_REASONS.get(reason, OTHER_SSL_REASONS.get(reason))
    code = "0A??????" if number is None else f"{_ERR_LIB_SSL << 23 | number:08X}"
    line = f"error:{code}:SSL routines::{text}"
    if number is not None and number >= 1000:  # a received alert: OpenSSL adds it as the error's data
        line += f":SSL alert number {number - 1000}"
    return line


# -- what nginx asks OpenSSL after the handshake: SSL_get_verify_result, X509_check_host -----------------

class _OpenSSL:
    """ctypes calls on the SSL object CPython's ssl module holds, for the checks nginx makes *after* the handshake.

    nginx's upstream SSL_CTX verifies with SSL_VERIFY_NONE (the client default; ``ngx_ssl_trusted_certificate``
    keeps the mode and only sets a callback that accepts everything), so OpenSSL verifies the chain, keeps the
    result and lets the handshake finish; ``ngx_http_upstream_ssl_handshake`` then asks
    ``SSL_get_verify_result`` and ``ngx_ssl_check_host`` (``X509_check_host``).  CPython's ssl module offers
    neither call, so this reaches the ``SSL *`` of an ``_ssl._SSLSocket`` (its second field after the object
    header, in CPython 3.10-3.13) and calls the libssl/libcrypto CPython itself loaded.  The pointer is
    checked once on a real socket (``SSL_get_fd`` must give the descriptor back) before it is ever used;
    where that check cannot pass, :class:`TLSClient` verifies the CPython way (``CERT_REQUIRED``: OpenSSL
    stops inside SSL_do_handshake; same verdict, nearly the same line, see ``TLSClient.verify_like``).
    """

    def __init__(self) -> None:
        import ctypes
        import sys

        if not ((3, 10) <= sys.version_info[:2] <= (3, 13)) or hasattr(sys, "getobjects"):
            raise OSError("the layout of _ssl._SSLSocket is only known for CPython 3.10-3.13 release builds")
        paths = {}
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
        for line in lines:
            path = line.split()[-1] if line.rstrip().count(" ") >= 5 else ""
            for lib in ("libssl.so", "libcrypto.so"):
                if lib in os.path.basename(path):
                    paths.setdefault(lib, path)
        if len(paths) != 2:
            raise OSError("CPython's libssl/libcrypto are not dynamically loaded here")
        self.ctypes = ctypes
        ssl_lib, crypto = ctypes.CDLL(paths["libssl.so"]), ctypes.CDLL(paths["libcrypto.so"])
        self.get_fd = ssl_lib.SSL_get_fd
        self.get_fd.argtypes, self.get_fd.restype = [ctypes.c_void_p], ctypes.c_int
        self.get_verify_result = ssl_lib.SSL_get_verify_result
        self.get_verify_result.argtypes, self.get_verify_result.restype = [ctypes.c_void_p], ctypes.c_long
        self.set_verify_depth = ssl_lib.SSL_set_verify_depth
        self.set_verify_depth.argtypes, self.set_verify_depth.restype = [ctypes.c_void_p, ctypes.c_int], None
        self.set_read_ahead = ssl_lib.SSL_set_read_ahead
        self.set_read_ahead.argtypes, self.set_read_ahead.restype = [ctypes.c_void_p, ctypes.c_int], None
        self.set_shutdown = ssl_lib.SSL_set_shutdown
        self.set_shutdown.argtypes, self.set_shutdown.restype = [ctypes.c_void_p, ctypes.c_int], None
        self.shutdown = ssl_lib.SSL_shutdown
        self.shutdown.argtypes, self.shutdown.restype = [ctypes.c_void_p], ctypes.c_int
        self.set_quiet_shutdown = ssl_lib.SSL_set_quiet_shutdown
        self.set_quiet_shutdown.argtypes, self.set_quiet_shutdown.restype = [ctypes.c_void_p, ctypes.c_int], None
        self.set_verify = ssl_lib.SSL_set_verify
        self.set_verify.argtypes, self.set_verify.restype = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p], None
        # ngx_ssl_verify_callback returns 1 whatever it is told (ngx_event_openssl.c, line 998): verification
        # goes on past an error, and SSL_get_verify_result keeps the *last* one (an unknown issuer of a lone
        # leaf: 20, then 21 "unable to verify the first certificate", which is what nginx logs)
        self._accept_all = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)(lambda ok, store: 1)
        peer = getattr(ssl_lib, "SSL_get1_peer_certificate", None) or ssl_lib.SSL_get_peer_certificate
        self.get_peer_certificate = peer
        peer.argtypes, peer.restype = [ctypes.c_void_p], ctypes.c_void_p
        self.check_host = crypto.X509_check_host
        self.check_host.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_void_p]
        self.check_host.restype = ctypes.c_int
        self.x509_free = crypto.X509_free
        self.x509_free.argtypes, self.x509_free.restype = [ctypes.c_void_p], None
        self.error_string = crypto.X509_verify_cert_error_string
        self.error_string.argtypes, self.error_string.restype = [ctypes.c_long], ctypes.c_char_p
        self._probe()

    def pointer(self, tls: ssl.SSLSocket) -> int:
        """The SSL * of ``tls``, checked: SSL_get_fd must return its descriptor (else OSError)."""
        obj = tls._sslobj
        address = self.ctypes.c_void_p.from_address(id(obj) + 3 * self.ctypes.sizeof(self.ctypes.c_void_p)).value
        if not address or self.get_fd(address) != tls.fileno():
            raise OSError("the SSL object of a CPython ssl socket could not be reached")
        return address

    def _probe(self) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        a, b = socket.socketpair()
        try:
            with ctx.wrap_socket(a, do_handshake_on_connect=False) as tls:
                self.pointer(tls)
        finally:
            a.close()
            b.close()

    def verify_like_nginx(self, ssl_ptr: int) -> None:
        """Before the handshake: SSL_VERIFY_NONE with nginx's accept-everything callback, depth 1."""
        self.set_verify(ssl_ptr, 0, self.ctypes.cast(self._accept_all, self.ctypes.c_void_p))
        self.set_verify_depth(ssl_ptr, NGX_VERIFY_DEPTH)  # proxy_ssl_verify_depth 1

    def close_notify(self, ssl_ptr: int, *, send: bool) -> int:
        """ngx_ssl_shutdown after a completed handshake (ngx_event_openssl.c): never wait for the peer's
        close_notify (SSL_RECEIVED_SHUTDOWN); ``send`` False adds SSL_SENT_SHUTDOWN and quiet shutdown (nothing
        written).  Returns what SSL_shutdown() returned."""
        mode = 2  # SSL_RECEIVED_SHUTDOWN
        if not send:
            mode |= 1  # SSL_SENT_SHUTDOWN
            self.set_quiet_shutdown(ssl_ptr, 1)
        self.set_shutdown(ssl_ptr, mode)
        return self.shutdown(ssl_ptr)

    def verify_result(self, ssl_ptr: int) -> tuple[int, str]:
        code = self.get_verify_result(ssl_ptr)
        return code, (self.error_string(code) or b"").decode(errors="replace")

    def host_matches(self, ssl_ptr: int, name: str) -> bool:
        """ngx_ssl_check_host: X509_check_host(peer certificate, name, flags 0) == 1 (DNS names only: an IP
        literal never matches, as in nginx)."""
        cert = self.get_peer_certificate(ssl_ptr)
        if not cert:
            return False
        try:
            raw = name.encode()
            return self.check_host(cert, raw, len(raw), 0, None) == 1
        finally:
            self.x509_free(cert)


_OPENSSL: _OpenSSL | None | bool = False  # False: not tried yet; None: not available here


def _openssl() -> _OpenSSL | None:
    global _OPENSSL
    if _OPENSSL is False:
        try:
            _OPENSSL = _OpenSSL()
        except (OSError, AttributeError, ValueError):
            _OPENSSL = None
    return _OPENSSL


# -- the verdict, as data ----------------------------------------------------------------------------------

#: outcome, nginx's code, next-upstream kind, log level, log line (the shape of nbconn.errors.Verdict)
TLSVerdict = namedtuple("TLSVerdict", ["outcome", "ngx_code", "ngx_next", "level", "log"])
_OK = TLSVerdict(HANDSHAKED, NGX_OK, None, None, None)

#: kind -> where nginx 1.22.1 decides it (for the docs and tests; the lines are built by handshake_verdict)
VERDICT_SOURCES = {
    "ok": "ngx_event_openssl.c ngx_ssl_handshake line 1737 (n == 1): NGX_OK",
    "timeout": "ngx_event_openssl.c ngx_ssl_handshake_handler line 2071; ngx_http_upstream.c "
             "ngx_http_upstream_ssl_handshake line 1808, ngx_http_upstream_next line 4306",
    "ssl": "ngx_event_openssl.c ngx_ssl_handshake line 1857, ngx_ssl_connection_error lines 3298-3466; "
           "ngx_http_upstream.c line 1814",
    "closed": "ngx_event_openssl.c ngx_ssl_handshake lines 1838-1845 (ngx_connection_error); "
              "ngx_http_upstream.c line 1814",
    "verify": "ngx_http_upstream.c ngx_http_upstream_ssl_handshake lines 1776-1784",
    "hostname": "ngx_http_upstream.c ngx_http_upstream_ssl_handshake lines 1786-1792",
}
HANDSHAKE_KINDS = tuple(VERDICT_SOURCES)


def handshake_verdict(kind: str, *, err: int = 0, reason: str = "", reason_text: str = "", verify_code: int = 0,
                      verify_message: str = "", server_name: str = "") -> TLSVerdict:
    """What nginx 1.22.1 makes of a handshake that ended with ``kind`` (one of :data:`HANDSHAKE_KINDS`).

    ``err``: the errno for "closed" (0 for a plain EOF); ``reason``/``reason_text``: OpenSSL's reason for
    "ssl"; ``verify_code``/``verify_message``: the X509 verify result for "verify"; ``server_name``: the
    name checked for "hostname".  Pure: no sockets, no clock.
    """
    validate.choice("kind", kind, HANDSHAKE_KINDS)
    if kind == "ok":
        return _OK
    if kind == "timeout":
        return TLSVerdict(TLS_TIMED_OUT, NGX_HTTP_UPSTREAM_FT_TIMEOUT, NGX_HTTP_UPSTREAM_FT_TIMEOUT, NGX_LOG_ERR,
                          f"upstream timed out {strerror(_errno.ETIMEDOUT)}{_TAIL}")
    if kind == "verify":
        return TLSVerdict(UNTRUSTED, NGX_ERROR, NGX_HTTP_UPSTREAM_FT_ERROR, NGX_LOG_ERR,
                          f"upstream SSL certificate verify error: ({verify_code}:{verify_message}){_TAIL}")
    if kind == "hostname":
        return TLSVerdict(UNTRUSTED, NGX_ERROR, NGX_HTTP_UPSTREAM_FT_ERROR, NGX_LOG_ERR,
                          f'upstream SSL certificate does not match "{c_escape(server_name)}"{_TAIL}')
    if kind == "closed":
        level = NGX_LOG_ERR if err in NGX_CONNECTION_ERROR_ERR_ERRNOS else NGX_LOG_ALERT
        detail = f" {strerror(err)}" if err else ""
        return TLSVerdict(PEER_CLOSED, NGX_ERROR, NGX_HTTP_UPSTREAM_FT_ERROR, level,
                          f"peer closed connection in SSL handshake{detail}{_TAIL}")
    # "ssl": SSL_ERROR_SSL
    level, text = _ssl_error("SSL_do_handshake()", reason, reason_text)
    return TLSVerdict(TLS_FAILED, NGX_ERROR, NGX_HTTP_UPSTREAM_FT_ERROR, level, text + _TAIL)


def _ssl_error(call: str, reason: str, reason_text: str) -> tuple[str, str]:
    """ngx_ssl_connection_error for SSL_ERROR_SSL (ngx_event_openssl.c lines 3298-3466): ERR for the reasons it
    lists, CRIT for the others; the text "CALL failed (SSL: error:...)"."""
    level = NGX_LOG_ERR if reason in NGX_SSL_HANDSHAKE_FAILURE_REASONS else NGX_LOG_CRIT
    return level, f"{call} failed (SSL: {openssl_error_string(reason, reason_text)})"


def ssl_failure(call: str, exc: ssl.SSLError) -> tuple[str, str]:
    """(level, text) nginx writes when ``call`` ("SSL_read()", "SSL_write()") fails with this OpenSSL error
    after the handshake: the same rule as the handshake's ("ssl" in :func:`handshake_verdict`)."""
    kind, details = classify(exc)
    if kind != "ssl":
        details = {"reason": getattr(exc, "reason", "") or "", "reason_text": str(exc)}
    return _ssl_error(call, details.get("reason", ""), details.get("reason_text", ""))


_REASON_TEXT = re.compile(r"^\[[^\]]*\] (.*?)(?: \(_ssl\.c:\d+\))?$")


def classify(exc: BaseException, server_name: str = "") -> tuple[str, dict]:
    """A failed ``do_handshake()`` as (kind, keyword arguments for :func:`handshake_verdict`).

    ssl.SSLCertVerificationError -> "verify" (or "hostname" for X509_V_ERR_HOSTNAME_MISMATCH); another
    ssl.SSLError with a reason -> "ssl"; an EOF (SSLEOFError, SSLZeroReturnError) or an OSError such as
    ECONNRESET -> "closed" with its errno.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code == _X509_V_ERR_HOSTNAME_MISMATCH:
            return "hostname", {"server_name": server_name}
        return "verify", {"verify_code": exc.verify_code, "verify_message": exc.verify_message}
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return "closed", {"err": 0}
    if isinstance(exc, ssl.SSLError) and getattr(exc, "reason", None):
        message = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], str) else str(exc)
        match = _REASON_TEXT.match(message)
        text = match.group(1) if match else exc.reason.lower().replace("_", " ")
        return "ssl", {"reason": exc.reason, "reason_text": text}
    if isinstance(exc, ssl.SSLSyscallError) or (isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError)):
        return "closed", {"err": exc.errno if isinstance(exc.errno, int) and exc.errno > 0 else 0}
    return "ssl", {"reason": "", "reason_text": str(exc)}


# -- the client's settings: one SSL_CTX, and the saved sessions ------------------------------------------

class TLSClient:
    """``proxy_ssl_*`` for one upstream: one SSLContext (nginx: one SSL_CTX per location,
    ``ngx_http_proxy_set_ssl``) and, with ``reuse``, the session saved per peer (nginx: the peer's
    set_session/save_session).  Make it once and pass it to every :func:`connect_tls` that should share
    sessions (CPython ties a session to the context that made it).

    ``cafile``: verify the peer against this CA file (nginx: ``proxy_ssl_verify on`` +
    ``proxy_ssl_trusted_certificate``); None: no verification, nginx's default (``proxy_ssl_verify off``).
    ``server_name``: the name checked (``proxy_ssl_name``), and sent with ``sni``; default: the target's
    host.  nginx checks it with X509_check_host, which matches DNS names only: an IP literal never matches
    (nginx's own default, ``$proxy_host``, is the upstream block's name).  ``sni``: send it in the
    ClientHello (``proxy_ssl_server_name``, off by default; never for an IP literal, RFC 6066).
    ``tls_version``: "1.2" or "1.3" only (``proxy_ssl_protocols``); None: nginx 1.22.1's default for
    upstreams, "TLSv1 TLSv1.1 TLSv1.2" (ngx_http_proxy_module.c lines 3726-3728): TLS 1.3 only when asked
    for (1.0 and 1.1 are refused by this OpenSSL's defaults anyway, and by the lab's peers).
    ``reuse``: offer the peer's saved session and save the new one (``proxy_ssl_session_reuse``).

    ``verify_like``: "nginx" (the handshake runs with SSL_VERIFY_NONE and the CA loaded, then
    SSL_get_verify_result and X509_check_host are asked, as ngx_http_upstream_ssl_handshake does), or
    "cpython" where the first cannot run here (see :class:`_OpenSSL`): CERT_REQUIRED, check_hostname, and
    the name then always goes out as SNI.
    """

    def __init__(self, *, cafile: str | None = None, server_name: str | None = None,
                 tls_version: str | None = None, reuse: bool = False, sni: bool = False) -> None:
        if cafile is not None and not isinstance(cafile, str):
            raise TypeError(f"cafile must be a path (str), got {validate.shown(cafile)}")
        if server_name is not None:
            if not isinstance(server_name, str) or not server_name or len(server_name) > 253 or \
                    any(not c.isprintable() or c.isspace() for c in server_name):
                raise ValueError(f"server_name {validate.shown(server_name)} must be a host name "
                                 "(1-253 printable characters, no spaces)")
        if tls_version is not None:
            validate.choice("tls_version", tls_version, tuple(TLS_VERSIONS))
        self.reuse = validate.flag("reuse", reuse)
        self.sni = validate.flag("sni", sni)
        self.cafile, self.server_name, self.tls_version = cafile, server_name, tls_version
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.options |= ssl.OP_IGNORE_UNEXPECTED_EOF  # as ngx_ssl_create (ngx_event_openssl.c line 379)
        ctx.set_ciphers("DEFAULT")  # proxy_ssl_ciphers' default (ngx_http_proxy_module.c line 3731)
        self.verify_like = None
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        if cafile is not None:
            try:
                ctx.load_verify_locations(cafile=cafile)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"cafile {validate.shown(cafile)}: cannot load it "
                                 f"({getattr(exc, 'strerror', None) or exc})") from None
            self.verify_like = "nginx" if _openssl() is not None else "cpython"
            if self.verify_like == "cpython":
                ctx.verify_mode = ssl.CERT_REQUIRED
                ctx.check_hostname = True
        if tls_version is not None:
            ctx.minimum_version = ctx.maximum_version = TLS_VERSIONS[tls_version]
        else:
            ctx.minimum_version, ctx.maximum_version = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2
        self.context = ctx
        #: peer (as nginx names it, "127.0.0.1:8443") -> the saved ssl.SSLSession
        self.sessions: dict[str, ssl.SSLSession] = {}

    @property
    def verify(self) -> bool:
        return self.cafile is not None

    def save(self, peer: str, tls: ssl.SSLSocket) -> bool:
        """nginx's save_session for ``peer`` (as nginx names it): keep the session of ``tls`` for the next
        handshake to that peer, when there is one to resume -- a TLS 1.2 session at the end of the handshake,
        a TLS 1.3 one only once its NewSessionTicket has arrived (OpenSSL's new-session callback,
        ngx_event_openssl.c line 1602).  Returns whether a session was saved."""
        session = tls.session
        if session is None or (tls.version() == "TLSv1.3" and not session.has_ticket):
            return False
        self.sessions[peer] = session
        return True

    def sni_for(self, name: str | None) -> str | None:
        """What goes to wrap_socket's server_hostname: the name when it is sent (SNI), or when CPython must
        check it (``verify_like == "cpython"``); else None."""
        if name is not None and (self.sni or self.verify_like == "cpython"):
            return name
        return None

    def name_for(self, target) -> str | None:
        """The server name for a parsed target: ``server_name``, else the host of an IP target, else None."""
        if self.server_name is not None:
            return self.server_name
        if target.family in (socket.AF_INET, socket.AF_INET6):
            return target.address[0]
        return None


# -- the result ------------------------------------------------------------------------------------------

@dataclass
class TLSResult:
    """A connect and the TLS handshake that followed it.

    - ``connect``: the connect's :class:`~nbconn.result.Result` (its steps, verdict, handshake_ns)
    - ``outcome``: one of :data:`TLS_OUTCOMES` once the connect succeeded; else the connect's outcome
    - ``ngx_decision`` / ``ngx_next`` / ``ngx_level`` / ``ngx_log``: nginx's verdict for the whole try (the
      connect's when the connect failed)
    - ``version``, ``cipher``: negotiated ("TLSv1.3", "TLS_AES_256_GCM_SHA384"); ``resumed``: the server
      took the offered session; ``session_offered``: a saved session was offered; ``session_saved``: this
      handshake left a session for the next one
    - ``timer``: "left" (the connect's timer, armed at connect(), bounds the handshake) or "fresh"
      (connect() returned 0: a new proxy_connect_timeout armed after the first NGX_AGAIN); ``timer_left_ns``:
      for "left", what was left of it when the handshake began
    - ``handshake_ns``: the TLS handshake: first SSL_do_handshake() call to the decision
    - ``total_ns``: connect() called to the TLS decision (the connect's handshake plus the TLS one)
    - ``calls``: SSL_do_handshake() calls; ``waits``: epoll waits between them
    - ``ngx_connect_time_ms`` (nginx-exact): $upstream_connect_time, which for https includes the handshake
      (ngx_http_upstream_send_request sets it, line 2073, and runs after the handshake)
    """

    connect: Result
    outcome: str = "error"
    ngx_decision: str | None = None
    ngx_next: str | None = None
    ngx_level: str | None = None
    ngx_log: str | None = None
    server_name: str | None = None
    verify: bool = False
    verify_like: str | None = None
    version: str | None = None
    cipher: str | None = None
    resumed: bool = False
    session_offered: bool = False
    session_saved: bool = False
    timer: str | None = None
    timer_left_ns: int | None = None
    timer_fired: bool = False
    handshake_ns: int | None = None
    total_ns: int | None = None
    calls: int = 0
    waits: int = 0
    ngx_connect_time_ms: int | None = None
    #: ``connect_tls(keep=True)`` after a completed handshake: the ssl.SSLSocket, still open, for the request
    #: (the caller closes it); None otherwise
    sock: object = field(default=None, repr=False)
    _steps: list = field(default_factory=list, repr=False)

    @property
    def handshaked(self) -> bool:
        return self.outcome == HANDSHAKED

    @property
    def steps(self) -> list[dict]:
        """The TLS steps: dicts like the connect's ``Step.to_dict`` (times relative to socket())."""
        t0 = self.connect.started_ns
        return [{"step": name, "ngx_step": 6, "ngx_step_name": "TLS handshake", "call": call, "ret": ret,
                 "t_start_ns": t1 - t0, "t_ns": t2 - t0, "duration_ns": t2 - t1, "ngx_handler": None}
                for name, call, ret, t1, t2 in self._steps]

    def summary(self) -> str:
        parts = [self.outcome]
        if self.version:
            parts.append(self.version + (" resumed" if self.resumed else ""))
        if self.handshake_ns is not None:
            parts.append(f"TLS in {format_ns(self.handshake_ns)}")
        if self.total_ns is not None:
            parts.append(f"(connect + TLS {format_ns(self.total_ns)})")
        nginx = f"nginx: {self.ngx_decision}"
        if self.ngx_next:
            nginx += f", next upstream: {self.ngx_next}"
        parts.append(f"({nginx})")
        return " ".join(parts)

    def trace(self) -> str:
        """The connect's trace, then the handshake's steps, strace -r -T style, and the verdict."""
        lines = [self.connect.trace()]
        t0 = self.connect.started_ns
        for name, call, ret, t1, t2 in self._steps:
            if name in ("timer", "timeout", "handler"):
                lines.append(f"{format_ns(t1 - t0):>10} {'(timer)' if name == 'timeout' else '':>11}  {call}")
            else:
                text = call if ret is None else f"{call} = {ret}"
                lines.append(f"{format_ns(t1 - t0):>10} {'<' + format_ns(t2 - t1) + '>':>11}  {text}")
        lines.append(f"-> {self.summary()}")
        if self.ngx_log:
            lines.append(f"nginx would log [{self.ngx_level}]: {self.ngx_log}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"outcome": self.outcome, "ngx_decision": self.ngx_decision, "ngx_next": self.ngx_next,
                "ngx_level": self.ngx_level, "ngx_log": self.ngx_log, "server_name": self.server_name,
                "verify": self.verify, "verify_like": self.verify_like, "version": self.version,
                "cipher": self.cipher, "resumed": self.resumed,
                "session_offered": self.session_offered, "session_saved": self.session_saved,
                "timer": self.timer, "timer_left_ns": self.timer_left_ns, "timer_fired": self.timer_fired,
                "handshake_ns": self.handshake_ns, "total_ns": self.total_ns, "calls": self.calls,
                "waits": self.waits, "ngx_connect_time_ms": self.ngx_connect_time_ms, "steps": self.steps,
                "connect": self.connect.to_dict()}


# -- the handshake on the loop: a state machine --------------------------------------------------------

WAITING, HANDSHAKING, READING_TICKET, FINISHED = "WAITING", "HANDSHAKING", "READING_TICKET", "FINISHED"


class Handshake:
    """The TLS handshake of one connection: WAITING (for the connect) -> HANDSHAKING [-> READING_TICKET]
    -> FINISHED.  The loop calls ``on_ready(events)`` and ``on_timer()``, as it does for the connect."""

    def __init__(self, client: TLSClient, target, loop: Loop, plan) -> None:
        self.client, self.target, self.loop, self.plan = client, target, loop, plan
        self.state = WAITING
        self.tls: ssl.SSLSocket | None = None
        self.fd = -1
        self.timer = None
        self.deadline_ns = None
        self.server_name = client.name_for(target)
        self.result: TLSResult | None = None
        self._t_first = 0
        self._t_connect = 0
        self._decided_ns = 0
        self._ssl_ptr = 0
        self._sock = None
        self._handshaked = False
        self.last_try = True
        self.keep = False  # connect_tls(keep=True): a completed handshake hands its socket to the result
        self._record = None

    # -- WAITING -> HANDSHAKING: the connect said NGX_OK ------------------------------------------------
    def begin(self, attempt: Attempt) -> None:
        """Take over the connected socket from ``attempt`` (nginx: ngx_http_upstream_ssl_init_connection)."""
        plan, loop, client = self.plan, self.loop, self.client
        connect = attempt.result
        result = self.result = TLSResult(connect=connect, server_name=self.server_name, verify=client.verify,
                                         verify_like=client.verify_like)
        record = self._record = result._steps.append if plan.trace else None
        self._t_connect = attempt._t_connect
        sock = self._sock = attempt.sock  # held here until wrapped: close() closes it on any path
        attempt.sock = None
        self.fd = fd = attempt.fd
        self.state = HANDSHAKING
        loop.hand_over(fd, self)  # the registration made before connect() serves the handshake too
        # The timer (ngx_http_upstream_ssl_init_connection lines 1731-1735): the connect's, if it was armed.
        if connect.connect_returned == "EINPROGRESS":
            self.deadline_ns = attempt._t_armed + plan.timeout_ns
            now = _monotonic_ns()
            result.timer, result.timer_left_ns = "left", max(0, self.deadline_ns - now)
            self.timer = loop.call_at(self.deadline_ns, self)
            if record:
                record(("timer", f"timer kept: {format_ns(result.timer_left_ns)} left of proxy_connect_timeout "
                        f"({plan.timeout_ms} ms, armed with the connect)", None, now, now))
        else:
            result.timer = "fresh"
        # ngx_ssl_create_connection + SSL_set_session (+ SNI): CPython's wrap_socket
        session = client.sessions.get(self.target.text) if client.reuse else None
        t = _monotonic_ns()
        try:
            if type(sock) is not socket.socket and hasattr(sock, "detach_to_socket"):
                sock = sock.detach_to_socket()  # nginx-exact's C socket: CPython wraps a Python socket
            if sock.gettimeout() != 0.0:
                sock.setblocking(False)  # the descriptor is non-blocking already; CPython must know it too
            sent = client.sni_for(self.server_name)
            tls = client.context.wrap_socket(sock, server_hostname=sent, do_handshake_on_connect=False,
                                             session=session)
        except OSError as exc:
            self._sock = None
            sock.close()
            loop.forget(fd)
            return self._finish(*classify(exc), when=_monotonic_ns())
        self.tls, self._sock = tls, None
        result.session_offered = session is not None
        openssl = _openssl()
        if openssl is not None:
            ptr = openssl.pointer(tls)
            # ngx_ssl_create: SSL_CTX_set_read_ahead(ctx, 1) (ngx_event_openssl.c line 390): OpenSSL then reads
            # up to a whole buffer per read(), as nginx's strace shows, not a 5-byte header and then the record
            openssl.set_read_ahead(ptr, 1)
            self._ssl_ptr = ptr
            if client.verify_like == "nginx":
                openssl.verify_like_nginx(ptr)
        if record:
            sni = f', SSL_set_tlsext_host_name("{sent}")' if sent and not _is_ip(sent) else ""
            offered = ", SSL_set_session(saved)" if session is not None else ""
            record(("wrap", f"SSL_new(), SSL_set_fd({fd}){sni}{offered}  [CPython wrap_socket: "
                    f"getsockopt(SO_TYPE), getsockname, getpeername, ioctl(FIONBIO)]", None, t, _monotonic_ns()))
        if client.reuse and self.target.family != socket.AF_UNIX:
            t = _monotonic_ns()
            try:
                tls.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                ret = 0
            except OSError as exc:
                ret = errno_name(exc.errno)
            if record:
                record(("setsockopt", f"setsockopt({fd}, SOL_TCP, TCP_NODELAY, [1], 4)", ret, t, _monotonic_ns()))
        self._t_first = _monotonic_ns()
        self._handshake()

    # -- HANDSHAKING ----------------------------------------------------------------------------------
    def _handshake(self) -> None:
        """One SSL_do_handshake() (ngx_ssl_handshake)."""
        result, record, tls = self.result, self._record, self.tls
        name = "SSL_do_handshake()"
        t = _monotonic_ns()
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            return self._again(t, "SSL_ERROR_WANT_READ", name)
        except ssl.SSLWantWriteError:
            return self._again(t, "SSL_ERROR_WANT_WRITE", name)
        except (ssl.SSLError, OSError) as exc:
            decided = _monotonic_ns()
            result.calls += 1
            kind, details = classify(exc, self.server_name or "")
            if record:
                shown = {"verify": "SSL_ERROR_SSL (certificate verify failed)",
                         "hostname": "SSL_ERROR_SSL (certificate verify failed: name)",
                         "closed": "SSL_ERROR_SYSCALL" if details.get("err") else "SSL_ERROR_SYSCALL (EOF)",
                         }.get(kind, f"SSL_ERROR_SSL ({details.get('reason') or exc})")
                record(("ssl_handshake", name, f"-1 {shown}", t, decided))
            return self._finish(kind, details, when=decided)
        decided = _monotonic_ns()
        result.calls += 1
        if record:
            record(("ssl_handshake", name, 1, t, decided))
        result.version, result.cipher = tls.version(), (tls.cipher() or (None,))[0]
        result.resumed = tls.session_reused
        self._decided_ns = decided
        self._handshaked = True
        if self._ssl_ptr and self.client.verify_like == "nginx":
            # ngx_http_upstream_ssl_handshake, proxy_ssl_verify on (lines 1776-1792): the chain, then the name
            t = _monotonic_ns()
            code, message = _OPENSSL.verify_result(self._ssl_ptr)
            if record:
                record(("verify", f"SSL_get_verify_result() = {code} ({message})", None, t, _monotonic_ns()))
            if code != 0:
                return self._finish("verify", {"verify_code": code, "verify_message": message}, when=decided)
            t = _monotonic_ns()
            matches = _OPENSSL.host_matches(self._ssl_ptr, self.server_name or "")
            if record:
                record(("check_host", f'X509_check_host(peer certificate, "{c_escape(self.server_name or "")}") '
                        f'= {int(matches)}', None, t, _monotonic_ns()))
            if not matches:
                return self._finish("hostname", {"server_name": self.server_name or ""}, when=decided)
        if self.client.reuse and self.keep:
            # the socket goes on to carry the request: a TLS 1.3 ticket is read with the response, as nginx
            # reads it, and the caller saves it then (TLSClient.save); a TLS 1.2 session is there already
            result.session_saved = self.client.save(self.target.text, self.tls)
        elif self.client.reuse:
            if result.version == "TLSv1.3":
                # The session to save comes after the handshake, in a NewSessionTicket: read on for it
                self.state = READING_TICKET
                return self._read_ticket()
            self._save_session()
        self._finish("ok", {}, when=decided)

    def _again(self, t: int, want: str, name: str = "SSL_do_handshake()") -> None:
        """NGX_AGAIN: back to the loop; arm a fresh timer if the connect did not leave one (line 1733)."""
        returned = _monotonic_ns()
        self.result.calls += 1
        record = self._record
        if record:
            record(("ssl_handshake", name, f"-1 {want}", t, returned))
        if self.timer is None:
            armed = self.loop.cached_msec * 1_000_000 if self.plan.nginx_exact else returned
            self.deadline_ns = armed + self.plan.timeout_ns
            self.timer = self.loop.call_at(self.deadline_ns, self)
            if record:
                record(("timer", f"timer armed: {self.plan.timeout_ms} ms (proxy_connect_timeout), fresh: "
                        "connect() returned 0, no timer was set", None, returned, returned))

    # -- READING_TICKET (TLS 1.3 with reuse) ----------------------------------------------------------
    def _read_ticket(self) -> None:
        """SSL_read until the NewSessionTicket has been processed (nginx: reading the response)."""
        tls, record = self.tls, self._record
        if self.timer is None:  # bounded like the handshake (nginx: proxy_read_timeout would bound it)
            self.deadline_ns = _monotonic_ns() + self.plan.timeout_ns
            self.timer = self.loop.call_at(self.deadline_ns, self)
        t = _monotonic_ns()
        waiting = False
        try:
            data = tls.recv(1)
            ret = len(data) if data else "0 (EOF)"
        except ssl.SSLWantReadError:
            ret, waiting = "-1 SSL_ERROR_WANT_READ", True
        except (ssl.SSLError, OSError) as exc:
            ret = f"-1 {type(exc).__name__}"
        session = tls.session
        if record:
            record(("ssl_read", "SSL_read() for the NewSessionTicket", ret, t, _monotonic_ns()))
        if session is not None and session.has_ticket:
            self._save_session()
        elif waiting:
            return  # back to the loop
        self._finish("ok", {}, when=self._decided_ns)  # saved, or no ticket will come (EOF, data, error)

    def _save_session(self) -> None:
        session = self.tls.session
        if session is not None:
            self.client.sessions[self.target.text] = session
            self.result.session_saved = True

    def _hand_out(self) -> None:
        """keep: the completed handshake's socket goes to the result, open, out of this loop (nginx goes on to
        ngx_http_upstream_send_request on the same connection)."""
        tls, self.tls, self._ssl_ptr = self.tls, None, 0
        loop, fd = self.loop, self.fd
        if loop.handler_of(fd) is self:
            if self.plan.nginx_exact:
                loop.forget(fd)
            else:
                t = _monotonic_ns()
                loop.unregister(fd)
                if self._record:
                    self._record(("unregister", f"epoll_ctl({loop.epoll_fd}, EPOLL_CTL_DEL, {fd}, NULL)", 0, t,
                                  _monotonic_ns()))
        self.result.sock = tls
        self.result.connect.finished_ns = _monotonic_ns()

    # -- loop callbacks ---------------------------------------------------------------------------------
    def on_ready(self, events: int) -> None:
        if self.state not in (HANDSHAKING, READING_TICKET):
            return
        loop, record = self.loop, self._record
        self.result.waits += 1
        if record:
            record(("epoll_wait", f"epoll_wait({loop.epoll_fd}, [{{events={event_names(events)}, "
                    f"data={{u32={self.fd}}}}}], {loop.max_events}, {loop.last_wait_ms})", 1,
                    loop.last_wait_started_ns, loop.last_wait_returned_ns))
        if self.state is READING_TICKET:
            return self._read_ticket()
        # ngx_epoll_process_events (ngx_epoll_module.c lines 862-930): EPOLLERR/EPOLLHUP add EPOLLIN and
        # EPOLLOUT; then the read handler runs for EPOLLIN and the write handler for EPOLLOUT, one after the
        # other.  After NGX_AGAIN both are ngx_ssl_handshake_handler (ngx_event_openssl.c lines 1803-1831), so
        # a report with both events calls SSL_do_handshake() twice (the second usually finds WANT_READ again).
        # Once the read handler's call has decided (= 1: ngx_http_upstream_ssl_handshake makes both handlers
        # ngx_http_upstream_handler and sends the request; a failure closes the connection, c->fd = -1, and
        # the write event is stale), the write handler is no longer the handshake's: no second call.
        if events & (EPOLLERR | EPOLLHUP):
            events |= EPOLLIN | EPOLLOUT
        if events & EPOLLIN:
            self._handshake()
            if events & EPOLLOUT and self.state is HANDSHAKING and record:
                now = _monotonic_ns()
                record(("handler", "EPOLLOUT too: the write handler, ngx_ssl_handshake_handler again", None, now,
                        now))
        if events & EPOLLOUT and self.state is HANDSHAKING:
            self._handshake()

    def on_timer(self) -> None:
        self.timer = None
        if self.state is READING_TICKET:  # the handshake itself succeeded; the ticket never came
            return self._finish("ok", {}, when=self._decided_ns)
        if self.state is not HANDSHAKING:
            return
        decided = _monotonic_ns()
        self.result.timer_fired = True
        if self._record:
            self._record(("timeout", f"timer expired ({self.plan.timeout_ms} ms after it was armed): "
                          "ngx_ssl_handshake_handler sees ev->timedout", None, decided, decided))
        self._finish("timeout", {}, when=decided)

    # -- -> FINISHED --------------------------------------------------------------------------------
    def _finish(self, kind: str, details: dict, *, when: int) -> None:
        result = self.result
        self.state = FINISHED
        if self.timer is not None:
            self.loop.cancel(self.timer)
            self.timer = None
        answer = handshake_verdict(kind, **details)
        result.outcome, result.ngx_decision, result.ngx_next = answer.outcome, answer.ngx_code, answer.ngx_next
        result.ngx_level, result.ngx_log = answer.level, answer.log
        result.handshake_ns = when - self._t_first if self._t_first else None
        result.total_ns = when - self._t_connect
        if self.plan.nginx_exact and kind == "ok" and result.connect.ngx_start_ns is not None:
            # $upstream_connect_time: ngx_http_upstream_send_request, after the handshake (line 2073)
            result.ngx_connect_time_ms = self.loop.cached_msec - result.connect.ngx_start_ns // 1_000_000
        if self.keep and kind == "ok" and self.tls is not None:
            return self._hand_out()
        self.close()

    def close(self) -> None:
        """Unregister (nginx-exact: leave it to close()) and close without SSL_shutdown (as nginx's
        next-upstream path, no_send_shutdown).  Idempotent."""
        tls, self.tls = self.tls, None
        ptr, self._ssl_ptr = self._ssl_ptr, 0  # freed with the socket
        sock, self._sock = self._sock, None
        if sock is not None:  # interrupted before the wrap: the plain socket is still ours
            self.loop.forget(self.fd)
            sock.close()
        if tls is None:
            return
        record, loop, fd = self._record, self.loop, self.fd
        if ptr and self._handshaked and self.state is FINISHED:
            # A completed handshake is shut down as nginx does (ngx_ssl_shutdown; never during a handshake,
            # SSL_in_init): the last try is finalized with a close_notify sent and not waited for
            # (ngx_http_upstream_finalize_request, line 4502); a try followed by another peer closes quietly
            # (ngx_http_upstream_next, lines 4413-4416).
            # This is nbconn ending its measurement, not nginx's next step: after SSL_do_handshake() = 1 nginx
            # calls ngx_http_upstream_send_request (getsockopt(SO_ERROR), the request's write); the
            # close_notify comes only when the request is finalized.  The trace says so.
            t = _monotonic_ns()
            ret = _OPENSSL.close_notify(ptr, send=self.last_try)
            if record:
                what = ("close_notify sent, not waited for, as nginx's finalize would send it" if self.last_try
                        else "quiet: nothing sent, as nginx's next upstream")
                record(("ssl_shutdown", f"SSL_shutdown() [nbconn ends its measurement here; nginx would now send "
                        f"the request (ngx_http_upstream_send_request: getsockopt(SO_ERROR), write); {what}]",
                        ret, t, _monotonic_ns()))
        if loop.handler_of(fd) is self:
            if self.plan.nginx_exact:
                loop.forget(fd)
            else:
                t = _monotonic_ns()
                loop.unregister(fd)
                if record:
                    record(("unregister", f"epoll_ctl({loop.epoll_fd}, EPOLL_CTL_DEL, {fd}, NULL)", 0, t,
                            _monotonic_ns()))
        t = _monotonic_ns()
        tls.close()  # CPython closes without SSL_shutdown: no close_notify is sent
        if record:
            record(("close", f"close({fd})", 0, t, _monotonic_ns()))
        if self.result is not None:
            self.result.connect.finished_ns = _monotonic_ns()


def _is_ip(name: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class _TLSAttempt(Attempt):
    """The connect of an https upstream: decided as nbconn.flow decides it, then -- if connected -- the
    socket goes to the :class:`Handshake` instead of being closed."""

    __slots__ = ("handshake",)
    WRITE_HANDLER = SSL_INIT_CONNECTION

    def _release(self, *, keep: bool) -> None:
        handshake = self.handshake
        if (handshake is not None and handshake.state is WAITING and self.sock is not None
                and self.result.outcome == CONNECTED):
            self.result.finished_ns = _monotonic_ns()
            handshake.begin(self)
            return
        super()._release(keep=keep)


def connect_tls(target, client: TLSClient | None = None, settings: Settings | None = None, *, last_try: bool = True,
                **keywords) -> TLSResult:
    """Connect nginx's way, then run the upstream TLS handshake on the same socket and epoll loop.

    ``client``: a :class:`TLSClient` (default: ``TLSClient()``, no verification, no reuse).
    ``settings``: a :class:`~nbconn.settings.Settings` or its keywords, as for :func:`nbconn.connect`;
    its ``timeout`` is proxy_connect_timeout, bounding connect and handshake together when connect()
    needed EPOLLOUT.  Edge-triggered epoll only (nginx's, and the one mode in which the registration made
    before connect() serves the handshake unchanged); no TCP_INFO is read.  Everything opened is closed
    before this returns -- except, with ``keep=True``, the socket of a completed handshake: it is
    ``TLSResult.sock`` (an ssl.SSLSocket, out of the epoll set), for the caller to send the request on and
    close (nbconn.nginx.upstream does, for ``proxy_pass https://``).  ``last_try``: how a completed handshake is
    closed: nginx sends close_notify when it finalizes the request (this was the last peer to try), and
    nothing when it moves on to the next peer (False).
    """
    settings = given(settings, keywords, "connect_tls")
    if client is None:
        client = TLSClient()
    elif not isinstance(client, TLSClient):
        raise TypeError(f"client must be a TLSClient, got {validate.shown(client)}"
                        + (" (a Settings goes third, or as settings=)" if isinstance(client, Settings) else ""))
    if settings.trigger != "edge":
        raise ValueError(f"connect_tls runs on edge-triggered epoll only (nginx's EPOLLET), not "
                         f"trigger={validate.shown(settings.trigger)}")
    last_try = validate.flag("last_try", last_try)
    keep = settings.keep  # the handshake's socket; the connect itself never keeps one (plan below)
    tgt = parse_target(target)
    if client.verify and client.name_for(tgt) is None:
        raise ValueError(f"target {validate.shown(target)}: verifying an AF_UNIX peer needs server_name "
                         "(the name to check the certificate against)")
    plan = replace(make_plan(tgt.family, settings), tcp_info=False, keep=False)  # the handshake reads no TCP_INFO
    with Loop(max_events=8, nginx_clock=settings.nginx_exact) as loop:
        handshake = Handshake(client, tgt, loop, plan)
        handshake.last_try = last_try
        handshake.keep = keep
        attempt = _TLSAttempt(tgt, plan, loop)
        attempt.handshake = handshake
        try:
            attempt.start()
            # Bounded: a pending connect, and a pending handshake, always has a timer armed.  (`while True`:
            # tests/test_interrupt_coverage.py says why.)
            while True:
                if attempt.state is DONE and handshake.state not in (HANDSHAKING, READING_TICKET):
                    break
                loop.run_once()
        except BaseException:
            result = handshake.result
            if result is not None and result.sock is not None:
                result.sock.close()
                result.sock = None
            raise
        finally:
            attempt.abort()
            handshake.close()
    if handshake.result is None:  # the connect failed: its verdict is the try's
        connect = attempt.result
        return TLSResult(connect=connect, outcome=connect.outcome, ngx_decision=connect.ngx_decision,
                         ngx_next=connect.ngx_next, ngx_level=connect.ngx_level, ngx_log=connect.ngx_log,
                         server_name=handshake.server_name, verify=client.verify, timer_fired=connect.timer_fired)
    return handshake.result


__all__ = ["TLSClient", "TLSResult", "Handshake", "connect_tls", "handshake_verdict", "classify",
           "openssl_error_string", "TLS_OUTCOMES", "HANDSHAKED", "TLS_TIMED_OUT", "UNTRUSTED", "TLS_FAILED",
           "PEER_CLOSED", "SSL_INIT_CONNECTION"]
