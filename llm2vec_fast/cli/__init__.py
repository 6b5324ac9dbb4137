"""``llm2vec-fast`` command line: one module per subcommand, each exposing ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand name -> module under llm2vec_fast.cli
SUBCOMMANDS = {
    "encode": "encode",
    "demo": "demo",
    "train": "train",
    "eval": "eval",
    "profile": "profile",
    "export": "export",
    "encode-dataset": "encode_dataset",
    "serve": "serve",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm2vec-fast", description="Fast LLM2Vec text encoders.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS.values():
        importlib.import_module(f"{__name__}.{module}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, OSError, RuntimeError) as err:
        if args.verbose:
            raise
        print(f"llm2vec-fast {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
