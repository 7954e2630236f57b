"""vlp's input errors: what the user gave is wrong (a config key, a path, a data file, a name).

The CLI turns a `VlpInputError` into one line and exit code 2, and nothing else: any other
exception is a bug (or a failure of the machine) and ends with exit code 1 and its traceback.
So raise one of these only where the user's input is at fault, naming the file, the dotted key
path or the option; a broken invariant inside vlp stays a plain `ValueError` / `KeyError`.

Each class also derives from the builtin it replaced (`ValueError`, `FileNotFoundError`, ...),
so code and tests that catch the builtin keep working.
"""

from __future__ import annotations


class VlpInputError(Exception):
    """The base of every vlp input error: the message is one line naming what is wrong."""


class ConfigError(VlpInputError, ValueError):
    """A bad config or option: the message names the file and the dotted key path."""


class DataError(VlpInputError, ValueError):
    """Bad input data: a missing file, an unreadable row, too many corrupt samples."""


class DeviceError(VlpInputError, ValueError):
    """The asked-for device is not there (the message says why)."""


class PretrainedError(VlpInputError, ValueError):
    """Weights that cannot be found offline or do not fit the model."""


class ExportError(VlpInputError, ValueError):
    """An export that cannot be written or read (format, folder, card)."""


class CheckpointReadError(VlpInputError, ValueError):
    """A checkpoint that cannot or may not be read."""


class UnsafeCheckpoint(VlpInputError, ValueError):
    """A checkpoint file that holds objects outside the unpickling allowlist."""


class SubmitError(VlpInputError, ValueError):
    """Bad submission input (cluster profile, option, path)."""


class RunExists(VlpInputError, FileExistsError):
    """A fresh run was pointed at a run folder that already holds another run's results."""


class InputNotFound(VlpInputError, FileNotFoundError):
    """A file or folder the user named (a config, a shard, a checkpoint) is not there."""


class UnknownName(VlpInputError, KeyError):
    """A name looked up in a registry (a head, tower, source, evaluator, export format) that
    nothing registered; the message lists what is and the nearest name."""

    def __str__(self) -> str:  # KeyError would print the message quoted, as a repr
        return str(self.args[0]) if self.args else ""
