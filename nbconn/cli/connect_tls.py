"""``connect TARGET --tls``: the connect, then the upstream TLS handshake nginx runs for ``proxy_pass https://``.

Flags: ``[--cafile FILE] [--server-name NAME] [--sni] [--tls-version 1.2|1.3] [--reuse]``.

Not a subcommand of its own: :mod:`nbconn.cli.connect` registers these flags and hands a ``--tls`` run
here.  Everything is checked -- flags, the CA file, the server name -- before any socket exists.

``--reuse`` runs the handshake twice with one client, as nginx's ``proxy_ssl_session_reuse on`` does for
two requests to one peer: the first saves its session, the second offers it.  ``--json`` then prints
``{"attempts": [first, second], "resumed": bool}``, else one :meth:`nbconn.nginx.tls.TLSResult.to_dict`.

Exit 0 when every handshake completed (and, with --reuse, the second was resumed is *reported*, not
required: a server may refuse), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json

from . import EXIT_FAILED, EXIT_OK, settings_from_args

TLS_VERSIONS = ("1.2", "1.3")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TLS (proxy_pass https://; nbconn.nginx.tls)")
    group.add_argument("--tls", action="store_true",
                       help="after the connect, run the upstream TLS handshake on the same socket and epoll loop")
    group.add_argument("--cafile", default=None, metavar="FILE",
                       help="verify the peer against this CA (proxy_ssl_verify on + proxy_ssl_trusted_certificate); "
                            "without it nothing is verified, nginx's default")
    group.add_argument("--server-name", default=None, metavar="NAME",
                       help="the name the certificate is checked against (proxy_ssl_name); default: the target's "
                            "host (an IP literal never matches, as in nginx: X509_check_host compares DNS names)")
    group.add_argument("--sni", action="store_true",
                       help="send the server name in the ClientHello (proxy_ssl_server_name on; off by default)")
    group.add_argument("--tls-version", choices=TLS_VERSIONS, default=None,
                       help="this TLS version only (proxy_ssl_protocols); default: nginx 1.22.1's for upstreams, "
                            "which stops at TLS 1.2")
    group.add_argument("--reuse", action="store_true",
                       help="proxy_ssl_session_reuse on: handshake twice, the second offering the first's session")


def check(args: argparse.Namespace) -> None:
    """Flags that need --tls, and what --tls does not combine with: ValueError (exit 2) before anything runs."""
    if not args.tls:
        given = [flag for flag, value in (("--cafile", args.cafile), ("--server-name", args.server_name),
                                          ("--tls-version", args.tls_version), ("--reuse", args.reuse or None),
                                          ("--sni", args.sni or None))
                 if value is not None]
        if given:
            raise ValueError(f"{given[0]} applies to a TLS handshake: add --tls")
        return
    if len(args.target) > 1 or args.happy_eyeballs is not None:
        raise ValueError("--tls applies to one target; it is not available with several targets or --happy-eyeballs")
    if args.trigger != "edge":
        raise ValueError("--tls runs on edge-triggered epoll only (nginx's EPOLLET: the registration made before "
                         "connect() serves the handshake unchanged); drop --trigger level")


def run(args: argparse.Namespace) -> int:
    from ..targets import parse_target
    from ..nginx.tls import TLSClient, connect_tls

    # the target and the connect's settings first: TLSClient probes CPython's SSL object on a socketpair
    settings = settings_from_args(args, keep=False)
    parse_target(args.target[0])
    client = TLSClient(cafile=args.cafile, server_name=args.server_name, tls_version=args.tls_version,
                       reuse=args.reuse, sni=args.sni)
    results = [connect_tls(args.target[0], client, settings)]
    if args.reuse and results[0].handshaked:
        results.append(connect_tls(args.target[0], client, settings))
    if args.json:
        if args.reuse:
            print(json.dumps({"attempts": [r.to_dict() for r in results],
                              "resumed": len(results) > 1 and results[1].resumed}, indent=2))
        else:
            print(json.dumps(results[0].to_dict(), indent=2))
    else:
        for i, result in enumerate(results):
            if args.reuse:
                print(("first handshake (saves its session):" if i == 0 else
                       "\nsecond handshake (offers the saved session):"))
            print(result.trace())
    return EXIT_OK if all(r.handshaked for r in results) else EXIT_FAILED
