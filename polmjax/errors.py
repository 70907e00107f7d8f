"""The one base class for errors a user fixes (config, data, checkpoints, missing files).

The CLI prints a `UserError` as one message plus its hint and exits with `USER_ERROR` (2, as argparse
does for a bad command line); anything else is a crash (exit 1, with the traceback). `--debug` shows
the traceback of user errors too. Library callers catch the specific subclasses (`ConfigError`,
`DataError`, `CheckpointError`, ...), which also keep their historical `ValueError`/`RuntimeError` bases.
"""

from __future__ import annotations

USER_ERROR = 2  # exit code of a user error; 1 is a crash, 3 a preempted run that saved and stopped


class UserError(Exception):
    """An error whose message names what to fix; `hint` (optional) says how."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint
