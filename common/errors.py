"""Errors a learner can act on.

Every error raised on purpose by the labs is a ``LabError``; ``common.config.run`` prints its
message as one line and exits non-zero instead of showing a traceback.
"""


class LabError(Exception):
    """An error with a message that says what went wrong and what to do next."""

    exit_code = 1


class DataUnavailable(LabError):
    """A real data set is not on disk and could not be downloaded."""


class CheckpointError(LabError):
    """A checkpoint file is missing, corrupt, foreign, or belongs to another model."""


class NonFiniteLoss(LabError):
    """The loss became NaN or infinite; the run stopped, keeping the last good checkpoint."""


class Interrupted(LabError):
    """Ctrl-C: the run saved a checkpoint and stopped."""

    exit_code = 130
