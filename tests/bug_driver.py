"""Run `vlp` with a bug planted in the clip head (used by tests/test_errors.py).

VLP_BUG_READS=no_such_tensor  the head's forward reads `inputs.local[that key]`, which no tower
                              produces: the KeyError of a head's own mistake, not bad input
VLP_BUG_KEYERROR=name         the head's forward raises a plain `KeyError(name)`
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlp.models.heads.clip import ClipHead  # noqa: E402

original = ClipHead.forward


def buggy_forward(self, inputs):
    if os.environ.get("VLP_BUG_READS"):
        inputs.local[os.environ["VLP_BUG_READS"]]  # a head reading a tensor no encoder produces
    if os.environ.get("VLP_BUG_KEYERROR"):
        raise KeyError(os.environ["VLP_BUG_KEYERROR"])
    return original(self, inputs)


ClipHead.forward = buggy_forward

if __name__ == "__main__":
    from vlp.cli import main

    sys.exit(main(sys.argv[1:]))
