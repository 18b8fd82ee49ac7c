"""Per-step timing and memory of a training loop, CPU or CUDA (shared by the training benchmarks)."""

from __future__ import annotations

import torch


class Times:
    """Per-step wall time, process CPU time (all threads), data wall time and, on CUDA, memory and the AMP scale."""

    def __init__(self):
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.data: list[float] = []
        self.peak: list[int] = []  # CUDA: bytes this loop alone would peak at during the step (see Memory)
        self.scale: list[float] = []  # fp16: the GradScaler's scale after the step

    def add(self, wall: float, cpu: float, data: float) -> None:
        self.wall.append(wall)
        self.cpu.append(cpu)
        self.data.append(data)

    def skip(self, warmup: int) -> Times:
        out = Times()
        out.wall, out.cpu, out.data = self.wall[warmup:], self.cpu[warmup:], self.data[warmup:]
        out.peak, out.scale = self.peak[warmup:], self.scale[warmup:]
        return out


def device_sync(device: torch.device):
    """A function that waits for ``device``'s queued work (a no-op on CPU): step times must include it."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


class Memory:
    """Per-step CUDA peak of one training loop while another loop's model stays resident in the process.

    ``start()`` before a step resets the peak counter and notes what is allocated; ``stop()`` after
    it returns ``own + (peak - allocated at start)``, where ``own`` is this loop's parameters,
    gradients and optimizer state at the start: what the loop would peak at alone. None on CPU.
    """

    def __init__(self, device: torch.device, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.device, self.model, self.optimizer = device, model, optimizer
        self.base = self.own = 0

    def start(self) -> None:
        if self.device.type != "cuda":
            return
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)
        tensors = [t for p in self.model.parameters() for t in (p, p.grad) if t is not None]
        tensors += [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        self.own = sum(t.numel() * t.element_size() for t in tensors if t.device.type == "cuda")

    def stop(self) -> int | None:
        if self.device.type != "cuda":
            return None
        return self.own + torch.cuda.max_memory_allocated(self.device) - self.base
