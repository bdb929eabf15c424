"""Errors a user can act on.

Every error here renders as one line naming the problem and the fix; the CLI prints
``error: <message>`` and exits non-zero instead of showing a traceback.
"""


class BenchError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class ConfigError(BenchError):
    """A malformed or inconsistent configuration (suite file, --set value, config.json)."""


class UnknownMethodError(BenchError):
    """A method name that no plugin registers."""


class HyperparameterError(BenchError):
    """A method hyperparameter that is unknown, of the wrong type, or out of range."""


class DatasetError(BenchError):
    """A dataset that is unknown or cannot be found on this machine."""


class MethodOutputError(ConfigError):
    """A method's hook returned what the contract forbids (a non-finite, negative or massless
    distribution, weights of the wrong shape, timesteps out of range)."""


class CheckpointError(BenchError):
    """A checkpoint that cannot be read or does not belong to this run."""


class DivergenceError(BenchError):
    """Training produced a non-finite loss."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step
