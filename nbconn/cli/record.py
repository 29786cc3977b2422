"""``python -m nbconn record NAME [--out DIR]``: record a dataset for data/ (nbconn.experiments.record)."""

from __future__ import annotations

from . import EXIT_OK

NAME = "record"


def add(subparsers) -> None:
    from ..experiments.record import RECIPES

    p = subparsers.add_parser(NAME, help="record a dataset for data/ (with its provenance)",
                              description="Record one of the datasets shipped in data/: " + "; ".join(
                                  f"{k}: {v}" for k, v in RECIPES.items()))
    p.add_argument("name", choices=list(RECIPES), metavar="NAME", help=", ".join(RECIPES))
    p.add_argument("--out", default="data", help="directory to write NAME.json into (default: data)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..experiments.record import record

    argv = ["record", args.name] + (["--out", args.out] if args.out != "data" else [])
    print(record(args.name, args.out, argv))
    return EXIT_OK
