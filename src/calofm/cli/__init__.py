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


def _interruption(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM behind ``exc``: itself, or the one an extension module turned into
    another error while it ran inside it (geant4-pybind's import raises an ImportError, h5py's
    attribute writing a TypeError); None for any other error."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


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
    except BaseException as exc:
        interrupt = _interruption(exc)
        if interrupt is None:
            raise
        terminated = isinstance(interrupt, Terminated)
        print(
            f"calofm {args.command}: interrupted{' (SIGTERM)' if terminated else ''}; finished "
            "work is kept: run the same command again to resume",
            file=sys.stderr,
        )
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
