"""Failures a user can act on, each with its exit code.

The CLI turns these into one line on stderr and the exit code; anything else
is a bug and keeps its traceback.
"""


class ReconError(Exception):
    """Base class: the message is shown to the user as is."""

    exit_code = 1


class BadInput(ReconError):
    """Bad input file, flag, config key or override."""

    exit_code = 2


class Refused(ReconError):
    """The safety gate flagged the input image."""

    exit_code = 3


class MissingWeights(ReconError):
    """Model weights could not be found or loaded; the message says how to get them."""

    exit_code = 4


def one_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    lines = str(error).strip().splitlines()
    return lines[0].rstrip(".") if lines else type(error).__name__
