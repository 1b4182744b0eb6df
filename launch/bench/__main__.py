"""``python -m launch.bench <suite> [options]``: run one benchmark suite (``--help`` lists them)."""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from launch.bench import dist, kernels, launches, optimizer, plan, precision
from launch.cli import OneLineParser

SUITES: dict[str, ModuleType] = {"optimizer": optimizer, "kernels": kernels, "dist": dist, "launches": launches,
                                 "precision": precision, "plan": plan}
"""Subcommand name -> suite module (``HELP``, ``add_arguments``, ``run``)."""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subcommand per suite (subparsers inherit OneLineParser)."""
    parser = OneLineParser(prog="python -m launch.bench", description=__doc__)
    suites = parser.add_subparsers(dest="suite", required=True, metavar="SUITE")
    for name, module in SUITES.items():
        module.add_arguments(suites.add_parser(name, help=module.HELP, description=module.__doc__))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line) and run the chosen suite; its exit status."""
    args = build_parser().parse_args(argv)
    return int(SUITES[args.suite].run(args))


if __name__ == "__main__":
    sys.exit(main())
