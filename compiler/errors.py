"""The one error type users see: a one-line message naming the problem and the fix.

The CLI turns a KilnError into `kiln: error: <message>` on stderr and exit code 2, with no
traceback. Anything else escaping is a bug in kiln and keeps its traceback.
"""

from __future__ import annotations


class KilnError(Exception):
    """A user-facing problem (bad input, missing file, unsupported model)."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}" if fix else problem)
