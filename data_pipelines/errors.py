"""The one error type of the data pipelines.

`DataError` is a `ValueError`, so the CLI maps it to exit code 2 (bad input). Its message is
one line naming what is wrong: the file, the row, the shard or the sample key.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data: a missing file, an unreadable row, too many corrupt samples."""
