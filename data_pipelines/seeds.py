"""Seeds the loaders derive from (seed, epoch, rank, worker role, ...), never from process state,
so the same run settings give the same batches on every run and after a resume."""

from __future__ import annotations

import hashlib
import random
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import get_worker_info


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts, stable across processes and Python runs (unlike hash())."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch, random and numpy for one sample's preprocess. In the main process
    (workers=0) the previous RNG states are put back, so the trainer's RNGs are not disturbed."""
    in_main = get_worker_info() is None
    if in_main:
        saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
    # The CPU generator only: torch.manual_seed also queues lazy CUDA seeding, which captures a
    # stack trace each call (~ms per sample); augmentations in a data worker run on the CPU.
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        if in_main:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])
