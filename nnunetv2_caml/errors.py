"""One-line errors for everything CAML refuses.

Every refusal by the trainer and the commands (data not ready, stale data, bad checkpoint, unsupported configuration)
raises a :class:`CAMLError` whose message is one line saying what to fix. Inside ``nnUNetv2_train`` (whose entry point
is nnU-Net's, not ours) :func:`install_one_line_errors` makes an uncaught ``CAMLError`` print as ``ERROR: message`` on
stderr, exit status 1, without a traceback; every other exception keeps Python's usual report.
"""
import sys


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
