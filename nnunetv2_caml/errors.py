"""One-line errors for everything CAML refuses.

Every refusal by the trainer and the commands (data not ready, stale data, bad checkpoint, unsupported configuration)
raises a :class:`CAMLError` whose message is one line saying what to fix. Inside ``nnUNetv2_train`` (whose entry point
is nnU-Net's, not ours) :func:`install_one_line_errors` makes an uncaught ``CAMLError`` print as ``ERROR: message`` on
stderr, exit status 1, without a traceback; every other exception keeps Python's usual report.
"""
import sys
from typing import Callable


class CAMLError(RuntimeError):
    """A problem the user must fix; the message is one line saying how."""


def _one_line_excepthook(exc_type, exc_value, exc_traceback, _previous=sys.excepthook):
    if issubclass(exc_type, CAMLError):
        print(f"ERROR: {exc_value}", file=sys.stderr, flush=True)
    else:
        _previous(exc_type, exc_value, exc_traceback)


def install_one_line_errors() -> None:
    """Print uncaught CAML errors of this process as one line (idempotent)."""
    if sys.excepthook is not _one_line_excepthook:
        _one_line_excepthook.__defaults__ = (sys.excepthook,)
        sys.excepthook = _one_line_excepthook


def run_resumable_command(work: Callable[[], object]) -> None:
    """Run a command's ``work`` (one that keeps finished cases when stopped): a :class:`CAMLError` ends it as
    ``ERROR: message`` with exit status 1, Ctrl-C with one line saying that a rerun continues."""
    try:
        work()
    except CAMLError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("ERROR: interrupted; finished cases are kept, rerun the same command to continue", file=sys.stderr)
        sys.exit(130)
