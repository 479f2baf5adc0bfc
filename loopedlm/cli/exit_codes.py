"""The exit codes of the `loopedlm` command (docs/exit_codes.md lists them), and the one
line an error that is not a bug ends it with (never a traceback; `-v` shows one)."""

from __future__ import annotations

import errno
import os

OK = 0
FAILED = 1  # a download or a sweep's run failed (the message says which)
BAD_INPUT = 2  # a flag, setting, recipe, path, port or prompt that is not allowed
COLLAPSED = 3  # training stopped at a non-finite loss (loopedlm.train.trainer)
OUT_OF_MEMORY = 4  # (loopedlm.train.trainer)
WRITE_FAILED = 5  # a checkpoint or another file could not be written (full disk, I/O error)
CANNOT_LISTEN = 6  # `serve`: the host and port cannot be listened on (in use, not allowed)
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), where it stops at once

# OSErrors that mean a path given (or LOOPEDLM_HOME) is not usable: bad input
PATH_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM,
               errno.EEXIST, errno.EROFS, errno.ENAMETOOLONG, errno.ELOOP, errno.EXDEV}
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG}


def error_exit(exc: BaseException) -> tuple[int, str]:
    """(exit code, one line) for an error a command ends with: KeyboardInterrupt, a
    ValueError (bad input) or an OSError (a path, a full disk, the network)."""
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED, "interrupted (Ctrl-C)"
    if not isinstance(exc, OSError) or exc.errno is None:
        return BAD_INPUT if isinstance(exc, ValueError | FileNotFoundError) else FAILED, \
            f"error: {exc}"
    where = f": {exc.filename}" if exc.filename is not None else ""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EEXIST and exc.filename is not None \
            and not os.path.isdir(exc.filename):  # mkdir(parents=True) over a file
        reason = "Not a directory"
    message = f"error: {reason}{where}"
    home = os.environ.get("LOOPEDLM_HOME")
    if home and exc.filename is not None and str(exc.filename).startswith(home):
        message += f" (LOOPEDLM_HOME={home} must be a folder loopedlm can write to)"
    if exc.errno in PATH_ERRNOS:
        return BAD_INPUT, message
    return (WRITE_FAILED if exc.errno in WRITE_ERRNOS else FAILED), message


__all__ = ["error_exit", "OK", "FAILED", "BAD_INPUT", "COLLAPSED", "OUT_OF_MEMORY",
           "WRITE_FAILED", "CANNOT_LISTEN", "INTERRUPTED"]
