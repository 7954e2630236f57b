"""Run `vlp` with events injected into cached accumulation (used by tests/test_grad_cache.py).

VLP_SIGNAL_AT_CALL=4     SIGUSR1 to this process at that call (1-based) of the objective's
                         forward: with grad_accum 2 a step makes three (the capture of
                         micro-batch 1, the whole batch, one replay), so 4 lands in step 2's
                         pass 1, before any of its backwards
VLP_NAN_AT_HEAD_CALL=1   the clip head returns a NaN loss on that call; under cached
                         accumulation heads run once per step, on the whole accumulated batch
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from vlp.models.heads.clip import ClipHead  # noqa: E402
from vlp.models.objective import Objective  # noqa: E402

signal_at = int(os.environ.get("VLP_SIGNAL_AT_CALL", "0"))
nan_at = int(os.environ.get("VLP_NAN_AT_HEAD_CALL", "0"))
calls = {"objective": 0, "head": 0}
objective_forward, head_forward = Objective.forward, ClipHead.forward


def counted_objective(self, encoded, batch):
    calls["objective"] += 1
    if calls["objective"] == signal_at:
        os.kill(os.getpid(), signal.SIGUSR1)
    return objective_forward(self, encoded, batch)


def faulty_head(self, inputs):
    calls["head"] += 1
    out = head_forward(self, inputs)
    if calls["head"] == nan_at:
        out = dict(out, loss=out["loss"] * torch.tensor(float("nan")))
    return out


Objective.forward = counted_objective
ClipHead.forward = faulty_head

if __name__ == "__main__":
    from vlp.cli import main

    sys.exit(main(sys.argv[1:]))
