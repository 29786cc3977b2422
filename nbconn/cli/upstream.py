"""``python -m nbconn upstream --peer A --peer B ...``: requests through nginx's round robin (nbconn.nginx.upstream)."""

from __future__ import annotations

import json

from .. import validate
from . import EXIT_OK, float_arg, int_arg

NAME = "upstream"


def next_upstream_arg(text: str) -> tuple:
    """``error,timeout`` / ``error,http_502`` / ``off`` (proxy_next_upstream): the kinds, or () for off."""
    from argparse import ArgumentTypeError

    from ..nginx.upstream import NEXT_UPSTREAM_ALL

    if text == "off":
        return ()
    kinds = text.split(",")
    for kind in kinds:
        if kind not in NEXT_UPSTREAM_ALL:
            raise ArgumentTypeError(f"--next-upstream {validate.shown(text)}: {validate.shown(kind)} is not one of "
                                    f"{', '.join(NEXT_UPSTREAM_ALL)} (or 'off' alone)")
    if len(set(kinds)) != len(kinds):
        raise ArgumentTypeError(f"--next-upstream {validate.shown(text)} names a kind twice")
    return tuple(kinds)


def add(subparsers) -> None:
    p = subparsers.add_parser(NAME, help="requests through an nginx-style upstream: round robin and failover",
                              description="Send R requests through an upstream of peers the way nginx's "
                                          "round robin and proxy_next_upstream would.")
    p.add_argument("--peer", action="append", required=True,
                   metavar="HOST[:PORT][,weight=N][,max_fails=N][,fail_timeout=T][,backup][,down]",
                   help="an upstream server line (repeat for more); PORT defaults to 80; T in nginx's units, "
                        "whole seconds (10, 10s, 1m, 1h30m)")
    p.add_argument("--requests", type=int_arg("--requests"), default=1, metavar="R")
    p.add_argument("--timeout", type=float_arg("--timeout"), default=1.0, metavar="S",
                   help="connect timeout per attempt (proxy_connect_timeout)")
    p.add_argument("--tries", type=int_arg("--tries"), default=0, metavar="N",
                   help="proxy_next_upstream_tries (0 = number of peers)")
    p.add_argument("--next-upstream-timeout", type=float_arg("--next-upstream-timeout"), default=0.0, metavar="S",
                   help="proxy_next_upstream_timeout in seconds (0 = no limit)")
    p.add_argument("--next-upstream", type=next_upstream_arg, default=("error", "timeout"), metavar="KINDS",
                   help="comma-separated: error, timeout, http_502 (and nginx's other kinds); or off "
                        "(proxy_next_upstream); default error,timeout")
    p.add_argument("--proxy-bind", metavar="ADDR", default=None,
                   help="proxy_bind: bind() every connect to this local IP address first; a bind() that fails "
                        "ends the request with 500 (nginx's NGX_ERROR)")
    p.add_argument("--http", action="store_true",
                   help="after connecting, send the request and read the response header as nginx does before "
                        "it decides (a peer that accepts then resets fails: recv() failed (104: ...))")
    p.add_argument("--read-timeout", type=float_arg("--read-timeout"), default=5.0, metavar="S",
                   help="with --http: proxy_read_timeout for the response header; default 5")
    p.add_argument("--keepalive", type=int_arg("--keepalive"), default=0, metavar="N",
                   help="`keepalive N` in the upstream block: cache up to N idle connections (HTTP/1.1 to the peers; "
                        "implies --http); each attempt says reused: true|false")
    tls = p.add_argument_group("TLS (proxy_pass https://; nbconn.nginx.tls)")
    tls.add_argument("--tls", action="store_true",
                     help="proxy_pass https://: after each connect, the TLS handshake on the same socket and loop, "
                          "on what is left of the connect's timer; its failures walk on as nginx's do (stage 'SSL "
                          "handshaking to upstream'); session reuse on, nginx's default")
    tls.add_argument("--cafile", default=None, metavar="FILE",
                     help="with --tls: proxy_ssl_verify on against this CA (proxy_ssl_trusted_certificate)")
    tls.add_argument("--server-name", default=None, metavar="NAME",
                     help="with --tls: proxy_ssl_name, the name the certificate is checked against")
    tls.add_argument("--tls-version", choices=("1.2", "1.3"), default=None,
                     help="with --tls: this version only (proxy_ssl_protocols); default nginx 1.22.1's, up to TLS 1.2")
    p.add_argument("--json", action="store_true",
                   help="per request: attempts (peer, outcome, connect_ms, stage, disabled, reused), result, "
                        "upstream_addr (as nginx logs $upstream_addr), and "
                        "log: the error-log lines nginx would write, \"[level] message\"")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..settings import check_timeout
    from ..nginx.upstream import Server, Upstream, run_requests

    check_timeout(args.timeout)
    if not args.tls:
        given = [flag for flag, value in (("--cafile", args.cafile), ("--server-name", args.server_name),
                                          ("--tls-version", args.tls_version)) if value is not None]
        if given:
            raise ValueError(f"{given[0]} applies to proxy_pass https://: add --tls")
    if args.proxy_bind is not None:
        import ipaddress

        try:
            ipaddress.ip_address(args.proxy_bind)
        except ValueError:
            raise ValueError(f"--proxy-bind {validate.shown(args.proxy_bind)} is not an IP address") from None
    peers = [Server.parse(spec) for spec in args.peer]
    client = None
    if args.tls:
        from ..nginx.tls import TLSClient

        client = TLSClient(cafile=args.cafile, server_name=args.server_name, tls_version=args.tls_version,
                           reuse=True)
    with Upstream(peers, keepalive=args.keepalive) as up:
        upstream_requests = run_requests(up, args.requests, timeout=args.timeout, next_upstream=args.next_upstream,
                                         tries=args.tries, next_upstream_timeout=args.next_upstream_timeout,
                                         http=args.http, read_timeout=args.read_timeout,
                                         proxy_bind=args.proxy_bind, tls=client)
    if args.json:
        print(json.dumps({"requests": [r.to_dict() for r in upstream_requests]}, indent=2))
    else:
        for i, r in enumerate(upstream_requests, 1):
            tried = ", ".join(f"{a.peer} {a.outcome}" + (" (reused)" if a.reused else "") for a in r.attempts) or "-"
            print(f"request {i}: {r.result}  tried: {tried}")
            for line in r.log:
                print(f"    nginx would log {line}")
    return EXIT_OK
