"""Errors a learner can act on.

Every error raised on purpose by the labs is a ``LabError``; ``common.runner.launch`` prints its
message as one line and exits non-zero instead of showing a traceback.
"""


import textwrap


def one_line(e: BaseException, width: int = 200) -> str:
    """An exception as one short line, cut at a word boundary (library errors span several)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return textwrap.shorten(text, width=width, placeholder=" ...")


class LabError(Exception):
    """An error with a message that says what went wrong and what to do next."""

    exit_code = 1


class ConfigError(LabError):
    """A setting is out of its range or contradicts another; found before any work starts."""

    exit_code = 2  # argparse's status for a bad command line


class DataUnavailable(LabError):
    """A real data set is not on disk and could not be downloaded."""


class DataError(LabError):
    """A data set is on disk but damaged or not what it should be."""


class CheckpointError(LabError):
    """A checkpoint file is missing, corrupt, foreign, or belongs to another model."""


class NonFiniteLoss(LabError):
    """The loss became NaN or infinite; the run stopped, keeping the last good checkpoint."""


class Interrupted(LabError):
    """Ctrl-C or SIGTERM: the run stopped; its last checkpoint (if any) is on disk."""

    exit_code = 130  # 128 + SIGINT, the shell's convention
