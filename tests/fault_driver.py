"""Run `vlp` with faults injected from the environment (used by tests/test_reliability.py).

VLP_FAULT_NAN_CALLS="3,4,5"  the clip head returns a NaN loss on these forward calls (1-based)
VLP_FAULT_EXIT_RANK=1, VLP_FAULT_EXIT_CALL=3   that rank dies (os._exit) on that forward call
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from vlp.models.heads.clip import ClipHead  # noqa: E402

calls = {"n": 0}
nan_calls = {int(c) for c in os.environ.get("VLP_FAULT_NAN_CALLS", "").split(",") if c}
exit_rank = os.environ.get("VLP_FAULT_EXIT_RANK")
exit_call = int(os.environ.get("VLP_FAULT_EXIT_CALL", "0"))
original = ClipHead.forward


def faulty_forward(self, inputs):
    calls["n"] += 1
    if exit_rank is not None and os.environ.get("RANK") == exit_rank and calls["n"] == exit_call:
        os._exit(3)
    out = original(self, inputs)
    if calls["n"] in nan_calls:
        out = dict(out, loss=out["loss"] * torch.tensor(float("nan")))
    return out


ClipHead.forward = faulty_forward

if __name__ == "__main__":
    from vlp.cli import main

    sys.exit(main(sys.argv[1:]))
