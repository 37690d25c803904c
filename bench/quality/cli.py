"""What every ``python -m bench.quality.*`` command shares: the exit-code contract of ``runtime.exit_codes``.

0 done; 1 a malformed data file (named by file and line); 2 bad usage (a missing file or task, a bad option or
engine); 3 the environment (the hub unreachable, a missing package, disk or permissions); 4 internal error.
"""

from __future__ import annotations

import argparse
from typing import Callable

from bench.quality.datafiles import DataError, MissingData
from bench.quality.hub import HubUnreachable
from runtime.bundle import EngineError
from runtime.deps import MissingDependency
from runtime.exit_codes import ENVIRONMENT, EPILOG, INPUT, USAGE, run_cli

ERRORS: dict[type[BaseException], int] = {
    MissingData: USAGE,
    DataError: INPUT,
    HubUnreachable: ENVIRONMENT,
    MissingDependency: ENVIRONMENT,
    ImportError: ENVIRONMENT,  # mteb, transformers, sentence-transformers: the [eval] / [train] extras
    EngineError: USAGE,
    ValueError: USAGE,
}


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the exit codes in its --help, --debug, and no abbreviated flags."""
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=EPILOG, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="on an internal error, print the traceback (else it goes to a log file)")
    return p


def run(body: Callable[[], int], prog: str, debug: bool) -> int:
    """``body()`` under the contract: any failure becomes one line on stderr and its exit code."""
    return run_cli(body, prog=prog, known=ERRORS, debug=debug)
