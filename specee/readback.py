"""Reading device decisions back to the host without stalling the device more than needed.

An exit test ends in a host read: did a row exit, can the step stop? On a GPU a plain ``tolist()`` waits for
everything queued before it. ``ReadBack`` instead queues a copy into pinned memory behind an event; work
queued after it (the layer after a tested one, with ``ExitConfig(lookahead=True)``) runs while the host waits
for the copy alone. ``Pending`` is a decision whose read-back is in flight: a policy returns it so the engine
can queue that layer before waiting; unpacking it (``exit, logits = pending``) waits, so a caller that does not
care reads it like the plain ``(exit, logits)`` pair.
"""
from __future__ import annotations

import torch


class ReadBack:
    """A few device values copied to the host: on CUDA through pinned memory behind an event (``result`` waits
    for the copy alone), elsewhere read at once."""

    def __init__(self, values: torch.Tensor):
        self.event = None
        if values.device.type == "cuda":
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            values = host.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        self.values = values

    def result(self) -> list:
        if self.event is not None:
            self.event.synchronize()
        return self.values.tolist()


class Pending:
    """A policy's decision waiting on a read-back: ``resolve()`` (or unpacking) gives ``(exit|None, logits|None)``."""

    def __init__(self, resolve):
        self._resolve, self._value = resolve, None

    def resolve(self):
        if self._value is None:
            self._value = self._resolve()
        return self._value

    def __iter__(self):
        return iter(self.resolve())
