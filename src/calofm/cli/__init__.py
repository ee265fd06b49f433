"""The ``calofm`` command: one sub-command per module in this package, each a thin layer.

Every module here defines ``register(subparsers)``, which adds its sub-command and sets
``func`` to a function taking the parsed arguments. Heavy imports (torch, geant4) happen inside
those functions, so ``calofm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

from calofm import __version__
from calofm.errors import CalofmError


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``calofm simulate: error: ...``) and exit 2, like CalofmError."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch system stopping a job), raised where Ctrl-C would be, so that every long
    command stops the same way and keeps what it finished."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """While a command runs, SIGTERM interrupts it like SIGINT (commands that checkpoint install
    their own handler for both)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="calofm",
        description="A foundation model for calorimeter shower simulation.",
    )
    parser.add_argument("--version", action="version", version=f"calofm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version or a usage error: return its exit code
        return int(exc.code or 0)
    try:
        with _sigterm_interrupts():
            return int(args.func(args) or 0)
    except CalofmError as exc:
        print(f"calofm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, ImportError) as exc:
        # An interruption inside an extension module's import (geant4-pybind) arrives as an
        # ImportError caused by the KeyboardInterrupt: it is still an interruption.
        cause = exc.__cause__ or exc.__context__
        if isinstance(exc, ImportError) and not isinstance(cause, KeyboardInterrupt):
            raise
        terminated = isinstance(exc, Terminated) or isinstance(cause, Terminated)
        print(
            f"calofm {args.command}: interrupted{' (SIGTERM)' if terminated else ''}; finished "
            "work is kept: run the same command again to resume",
            file=sys.stderr,
        )
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
