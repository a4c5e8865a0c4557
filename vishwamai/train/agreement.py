"""One agreement per step: every cross-rank decision of a step in one small tensor, reduced once.

Ranks must take the same decisions (skip this update, shrink the batch, save and stop) or they
fall out of step.  Instead of one blocking collective per feature, each feature registers a
*vote* (a name, how to read its local value, how to combine it) and the loop reduces all of them,
with the step's mean loss and loss terms, in one all-reduce (a sum) after the gradients are
clipped.  The result is read to the host once: the loss is a plain number from then on, with no
`.item()` of its own.

How values combine under a single sum:
  mean  the ranks' mean (loss, loss terms): summed, divided by the world size
  any   true on every rank if true on any rank (stop, SIGTERM): 0/1, summed, > 0
  max   the largest small count (OOM shrinks this step): a thermometer of MAX_COUNT slots
        (slot i is 1 where count > i), summed; the number of non-zero slots is the maximum
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

MAX_COUNT = 32  # a "max" vote above this agrees on MAX_COUNT
KINDS = ("any", "max")


@dataclass
class Vote:
    read: Callable[[], float]
    kind: str


class StepAgreement:
    def __init__(self, parallel, device: torch.device):
        self.parallel, self.device = parallel, device
        self.votes: dict[str, Vote] = {}
        self.agreed: dict[str, float] = {}  # the last agreement: vote names and mean names -> values

    def register(self, name: str, read: Callable[[], float], kind: str = "any") -> None:
        """From the next agreement on, `read()` (this rank's value) is agreed as `agreed[name]`."""
        if kind not in KINDS:
            raise ValueError(f"vote {name!r}: kind {kind!r} is not one of {KINDS}")
        if name in self.votes:
            raise ValueError(f"vote {name!r} is already registered")
        self.votes[name] = Vote(read, kind)

    def reduce(self, means: dict[str, torch.Tensor]) -> dict[str, float]:
        """Agree on the registered votes and on the ranks' mean of each of `means` (scalar tensors)."""
        flags: list[float] = []
        for vote in self.votes.values():
            value = vote.read()
            if vote.kind == "any":
                flags.append(1.0 if value else 0.0)
            else:
                flags.extend(1.0 if value > i else 0.0 for i in range(MAX_COUNT))
        parts = [torch.stack([t.detach().float().reshape(()) for t in means.values()])] if means else []
        parts.append(torch.tensor(flags, dtype=torch.float32, device=self.device))
        total = self.parallel.all_reduce_sum(torch.cat([p.to(self.device) for p in parts])).tolist()
        world = self.parallel.world_size
        agreed = {name: value / world for name, value in zip(means, total)}
        position = len(means)
        for name, vote in self.votes.items():
            if vote.kind == "any":
                agreed[name] = total[position] > 0
                position += 1
            else:
                agreed[name] = sum(1 for v in total[position: position + MAX_COUNT] if v > 0)
                position += MAX_COUNT
        self.agreed = agreed
        return agreed
