"""monitoring.profile=true: a torch.profiler trace (with memory) of steps
[profile_start, profile_start + profile_steps), written for TensorBoard's profiler plugin
under RUN_DIR/tensorboard/profiler (also opens in Perfetto / chrome://tracing). Rank 0 only."""

from __future__ import annotations

from pathlib import Path

import torch

from vishwamai.train.events import Callback


class Profiler(Callback):
    def __init__(self, trace_dir: Path, start: int, steps: int):
        self.trace_dir = Path(trace_dir)
        self.start, self.stop_at = start, start + steps
        self.profiler = None

    def on_step_start(self, trainer) -> None:
        if trainer.state.step != self.start or not trainer.is_main or self.profiler is not None:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if trainer.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(
            activities=activities, record_shapes=True, profile_memory=True, with_stack=False,
            on_trace_ready=torch.profiler.tensorboard_trace_handler(str(self.trace_dir)))
        self.profiler.start()

    def on_step_end(self, trainer) -> None:
        if trainer.state.step >= self.stop_at:
            self._finish(trainer)

    def _finish(self, trainer) -> None:
        if self.profiler is not None:
            self.profiler.stop()  # writes the trace
            self.profiler = None
            trainer.summary["profile_dir"] = str(self.trace_dir)

    def on_train_end(self, trainer) -> None:
        self._finish(trainer)

    def on_exception(self, trainer, *, error: BaseException) -> None:
        self._finish(trainer)
