"""The run's fault counters: one owner for what went wrong, what it cost, and its checkpoint state.

Skipped learner steps (a non-finite loss or gradient) and the streak of them, resumes, samplers
that died and were brought back, samplers lost with their node (dropped from the fleet), and
groups sampled again because of either. `Samplers` counts its restarts and losses here; the
loop counts skipped steps and stops once learner.max_skipped_steps come in a row. Checkpoints
keep the counters (not the streak: a resumed run starts a new one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Faults:
    max_skipped_steps: int = 3  # learner.max_skipped_steps
    skipped_steps: int = 0
    skipped_in_row: int = 0
    resumes: int = 0
    sampler_restarts: int = 0
    samplers_lost: int = 0  # dropped with their node (rl/samplers.py); a resume places them again
    resampled_groups: int = 0

    def learner_step(self, skipped: bool):
        self.skipped_steps += skipped
        self.skipped_in_row = self.skipped_in_row + 1 if skipped else 0

    @property
    def too_many_skipped(self) -> bool:
        return self.skipped_in_row >= self.max_skipped_steps

    def stop_if_too_many_skipped(self, step: int, learn_metrics: dict, checkpoints: Path):
        """Raise once learner.max_skipped_steps steps in a row were skipped (after the loop's checkpoint)."""
        if self.too_many_skipped:
            raise FloatingPointError(
                f"{self.skipped_in_row} steps in a row (to step {step}) had a non-finite loss or gradient "
                f"(loss {learn_metrics['learner/loss']}, grad norm {learn_metrics['learner/grad_norm']}): "
                f"learner.max_skipped_steps={self.max_skipped_steps}. The last good weights and optimiser state "
                f"are in {checkpoints}.")

    def metrics(self) -> dict:
        return {"fault/skipped_steps": self.skipped_steps, "fault/resumes": self.resumes,
                "fault/sampler_restarts": self.sampler_restarts, "fault/samplers_lost": self.samplers_lost,
                "fault/resampled_groups": self.resampled_groups}

    def state(self) -> dict:
        return self.metrics()

    def restore(self, state: dict):
        """The counters of a checkpoint, this resume counted."""
        self.skipped_steps, self.resumes = state["fault/skipped_steps"], state["fault/resumes"] + 1
        self.sampler_restarts, self.resampled_groups = state["fault/sampler_restarts"], state["fault/resampled_groups"]
        self.samplers_lost = state.get("fault/samplers_lost", 0)  # absent in checkpoints from before it was counted
        self.skipped_in_row = 0
