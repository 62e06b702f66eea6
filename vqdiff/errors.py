"""User errors, and the one place that turns them into a line on stderr.

A user error is something the person running a command can fix: a wrong option or config value, a missing or
corrupt file, a run directory that already holds a run, a training run that diverged. `run_main` logs such an
error as one line on stderr and returns exit code 2; anything else is a bug and keeps its traceback.
`--debug` (anywhere on the command line) or VQDIFF_DEBUG=1 shows the traceback of user errors too.
"""

import errno
import logging
import os
import sys
from typing import Callable

from .runtime import keep_freed_memory

log = logging.getLogger("vqdiff")

USER_ERROR_EXIT = 2
# operating-system errors about the user's files and disks rather than about vqdiff's code
USER_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EISDIR,
               errno.ENOTDIR, errno.EEXIST, errno.ENOTEMPTY}


class UserError(Exception):
    """An error the user can fix; its message says what is wrong and, where it helps, what to do."""


class ConfigError(UserError, ValueError):
    """A config file, override or option that does not fit the schema or its allowed range."""


def is_user_error(error: BaseException) -> bool:
    if isinstance(error, (UserError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return True
    return isinstance(error, OSError) and error.errno in USER_ERRNOS


def one_line(message: str) -> str:
    """A message with several lines (a list of differing keys, say) joined into one."""
    line = ""
    for part in (p.strip() for p in str(message).splitlines()):
        if part:
            line += part if not line else (" " if line.endswith(":") else "; ") + part
    return line


def run_main(function: Callable[[list[str]], object], argv: "list[str] | None" = None, prog: str = "vqdiff") -> int:
    """Call `function(argv)` (without any `--debug` flag); returns the exit code: 0, or 2 after a user error,
    which is printed as one line on stderr. Other exceptions propagate with their traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("VQDIFF_DEBUG", "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    keep_freed_memory()  # every command and script: freed tensors' memory is reused, not faulted in again
    try:
        function(argv)
    except Exception as error:
        if not is_user_error(error):
            raise
        log.error("%s: %s", prog, one_line(error), exc_info=debug)
        return USER_ERROR_EXIT
    return 0


def script_main(function: Callable[[list[str]], object], prog: str) -> None:
    """A script's `__main__` block: `run_main`, exiting with code 2 after a user error and returning normally
    otherwise (so that `runpy` callers carry on)."""
    code = run_main(function, prog=prog)
    if code:
        sys.exit(code)
