"""How `deepspeed.grad_accum` micro-batches make one optimizer step (`train.accumulate`).

`plain` is DeepSpeed's accumulation: forward, backward and `engine.step()` per micro-batch, so
each contrastive loss sees only its own micro-batch's negatives (batch_size x ranks pairs).

`contrastive` is cached-feature accumulation (GradCache, Gao et al. 2021; open_clip's
`--accum-freq`): the loss of every head sees all grad_accum x ranks x batch_size pairs and the
update equals one step on that whole batch. With k = grad_accum micro-batches per rank:

  1. pass 1: micro-batches 1..k-1 through the engine's forward without grad, keeping only their
     pooled embeddings (`objective.Capture`) and the RNG state each started from;
  2. the step's one loss: micro-batch 0 with grad (forwarded once), its embeddings followed by the
     cached ones of micro-batches 1..k-1 as leaves (`objective.WholeBatch`), gathered across
     ranks as a dense k x batch_size batch would be. Its backward gives the towers their
     gradient through micro-batch 0, every head parameter (logit scale, SigLIP bias, MERU's
     curvature ...) its gradient exactly once, and the leaves d loss / d embedding;
  3. pass 2: micro-batches 1..k-1 again with grad under their pass-1 RNG state (dropout and
     patch dropout draw the same masks), each backward of sum <embedding, d loss / d embedding>
     (`objective.Replay`).

Every backward is `engine.backward` after an `engine(...)` forward followed by `engine.step()`, k
of each per step as DeepSpeed counts micro-steps, so ZeRO's gradient hooks, its accumulation
boundary and the trainer's clipping work unchanged. `engine.backward` divides by
gradient_accumulation_steps (= k), which the k factor on each loss undoes, and multiplies by the
fp16 loss scale, which a probe term measures (`_probe`) so that the leaves' gradients are divided
back to d loss / d embedding whatever DeepSpeed's scaler holds.

The whole-batch loss is known after pass 1, before any backward: a non-finite one skips the
whole accumulated step. Cost (docs/large_batch.md): k - 1 extra forwards without grad per
step, the step's k input batches and its pooled embeddings held across the step.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional, Protocol

import torch

from vlp.models.objective import CACHED_PASS, Capture, ConcatenatedBatch, Replay, WholeBatch
from vlp.train.engine import Engine

Batch = dict[str, Any]
Clip = Callable[[], Optional[torch.Tensor]]  # the trainer's clipping: the gradient norm at the boundary, or None


class Accumulation(Protocol):
    """One call of `forward` then `backward_and_step` per loop iteration."""

    micro_batches: int  # micro-batches one iteration takes from the stream

    def forward(self, next_batch: Callable[[], Batch]) -> dict[str, Any]: ...

    def backward_and_step(self, out: dict[str, Any], clip: Clip) -> Optional[torch.Tensor]: ...


class PlainAccumulation:
    """DeepSpeed's own: one micro-batch per iteration; the engine steps at its boundary."""

    micro_batches = 1

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def forward(self, next_batch: Callable[[], Batch]) -> dict[str, Any]:
        return self.engine(next_batch())

    def backward_and_step(self, out: dict[str, Any], clip: Clip) -> Optional[torch.Tensor]:
        self.engine.backward(out["loss"])
        grad_norm = clip()
        self.engine.step()
        return grad_norm


class RngSnapshot:
    """The CPU and (on CUDA) this rank's device RNG state at one moment; `replay()` runs a block
    from that state and leaves the global RNG as it was (GradCache's RandContext)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=[self.device] if self.cuda is not None else []):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


class CachedAccumulation:
    """All k = gradient_accumulation_steps micro-batches of a step per iteration (module docstring)."""

    def __init__(self, engine: Engine, device: torch.device) -> None:
        self.engine = engine
        self.device = device
        self.micro_batches = int(engine.gradient_accumulation_steps())
        if self.micro_batches < 2:
            raise ValueError("cached accumulation needs gradient_accumulation_steps >= 2")
        # Between forward and backward_and_step, for micro-batches 1..k-1: the batches, their
        # pass-1 RNG states, the leaves and the rows each holds.
        self._pending: Optional[tuple[list[Batch], list[RngSnapshot], dict[str, torch.Tensor], list[int]]] = None

    def forward(self, next_batch: Callable[[], Batch]) -> dict[str, Any]:
        """Pass 1 over micro-batches 1..k-1, then the whole-batch forward with micro-batch 0 live:
        returns its {"loss", "logging"} (over all k x ranks x batch_size pairs), backward pending.

        Micro-batch 0 is forwarded once, with grad, after the others' captures: a capture of it
        would only be recomputed, and drawing its masks last keeps every micro-batch's RNG
        stream its own (a replay of micro-batch 0 from pass 1's first state would share it)."""
        batches = [next_batch() for _ in range(self.micro_batches)]
        states, cached = [], []
        with torch.no_grad():
            for batch in batches[1:]:
                states.append(RngSnapshot(self.device))
                cached.append(self.engine({**batch, CACHED_PASS: Capture()})["features"])
        # (R, ...) per key, the rows of micro-batches 1..k-1 in order; their .grad is filled by
        # the whole-batch backward.
        rest = {key: torch.cat([features[key] for features in cached]).requires_grad_() for key in cached[0]}
        out = self.engine({**batches[0], CACHED_PASS: WholeBatch(rest, ConcatenatedBatch(batches))})
        sizes = [len(next(iter(features.values()))) for features in cached]
        self._pending = (batches[1:], states, rest, sizes)
        return out

    def backward_and_step(self, out: dict[str, Any], clip: Clip) -> Optional[torch.Tensor]:
        """The whole-batch backward, then pass 2; k engine steps (the last one the boundary).
        Returns the gradient norm `clip` gave at the boundary (None where DeepSpeed clips)."""
        if self._pending is None:
            raise RuntimeError("backward_and_step without a forward")
        replays, states, rest, sizes = self._pending
        self._pending = None
        k = self.micro_batches
        probe = torch.zeros((), device=out["loss"].device, requires_grad=True)
        self.engine.backward(k * (out["loss"] + _probe(probe)))
        grad_norm = clip()
        self.engine.step()
        # d loss / d embedding of micro-batches 1..k-1: every gradient of what the engine was
        # given carries one factor (k, the engine's 1 / k, the fp16 loss scale), the probe's.
        grads = {key: (leaf.grad.float() / probe.grad).split(sizes) for key, leaf in rest.items()}
        del rest
        for index, (batch, state) in enumerate(zip(replays, states)):
            role = Replay({key: parts[index] for key, parts in grads.items()})
            with state.replay():
                replayed = self.engine({**batch, CACHED_PASS: role})
            self.engine.backward(k * replayed["loss"])
            grad_norm = clip()
            self.engine.step()
        return grad_norm


def _probe(probe: torch.Tensor) -> torch.Tensor:
    """0 in value, gradient 1 with respect to `probe`: added to a loss, probe.grad after the
    backward is the factor every gradient of that loss was multiplied by on the way."""
    return probe - probe.detach()


def build_accumulation(engine: Engine, mode: str, device: torch.device, is_main: bool) -> Accumulation:
    """`train.accumulate`'s driver for this engine; says which in one line when it matters
    (gradient_accumulation_steps > 1)."""
    micro_batches = int(engine.gradient_accumulation_steps())
    if micro_batches == 1:
        return PlainAccumulation(engine)
    if is_main:
        what = ("every contrastive loss over all cached micro-batches (GradCache)" if mode == "contrastive"
                else "each micro-batch's loss over its own negatives only (DeepSpeed's)")
        print(f"[vlp] train.accumulate: {mode}: {micro_batches} micro-batches per step, {what}", flush=True)
    return CachedAccumulation(engine, device) if mode == "contrastive" else PlainAccumulation(engine)
