"""Errors a user can cause, and the one way every entry point reports them."""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable

USAGE_EXIT_CODE = 2
# A search ran and no trial met its quality budget (results are still written).
BUDGET_NOT_MET_EXIT_CODE = 3
INTERRUPTED_EXIT_CODE = 130  # as a shell reports a command ended by Ctrl-C


class UserError(Exception):
    """Bad input: printed as one line naming the problem, exit code 2, nothing written."""


class Interrupted(Exception):
    """The user stopped long work before it finished (Ctrl-C): one line saying how to resume, exit 130,
    no partial results written as if they were whole."""


def reports_user_errors(prog: str) -> Callable[[Callable[..., int | None]], Callable[..., int]]:
    """Wrap a `main` so a UserError prints `prog: error: ...` and exits 2 instead of a traceback (an
    Interrupted: `prog: interrupted: ...`, exit 130)."""

    def wrap(main: Callable[..., int | None]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs) or 0
            except UserError as exc:
                print(f"{prog}: error: {exc}", file=sys.stderr)
                return USAGE_EXIT_CODE
            except Interrupted as exc:
                print(f"{prog}: interrupted: {exc}", file=sys.stderr)
                return INTERRUPTED_EXIT_CODE

        return run

    return wrap
