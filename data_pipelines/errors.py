"""The data pipelines' input errors, defined with the rest of vlp's in `vlp.core.errors`.

`DataError` is a `VlpInputError`, so the CLI maps it to exit code 2 (bad input). Its message is
one line naming what is wrong: the file, the row, the shard or the sample key.
"""

from __future__ import annotations

from vlp.core.errors import DataError  # noqa: F401 (imported from here by the pipelines)
