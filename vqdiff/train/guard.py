"""The divergence guard of the training loops: a run that blows up stops before a bad checkpoint is written.

Looked at:
- the loss of every step: NaN or infinite stops the run at once (all processes agree through a reduce);
- the gradient norm of every step (before clipping): NaN or infinite, or above `train.guard_grad_factor` times
  the median of the last 100 norms (once 10 are known); under fp16 mixed precision an infinite norm is the
  loss scaler's overflow, whose step it skips, so it is not counted;
- the parameters before every checkpoint write: any NaN or infinite value in the trained or the EMA weights,
  or a total norm above `train.guard_param_factor` times the norm at the start of the run.
A checkpoint is written only after these checks pass, so the last one on disk is the last good one; the error
names the step and that checkpoint. The norm of step k is read at step k + 1, where the loss check waits for
the device anyway, so the guard adds no synchronisation of its own.
"""

import collections
import math
import statistics
from pathlib import Path

import torch

from ..errors import UserError

WINDOW, MIN_HISTORY = 100, 10


class TrainingDiverged(UserError, RuntimeError):
    """The loss, gradients or weights became NaN, infinite or exploded; the last checkpoint on disk is intact."""


class DivergenceGuard:
    def __init__(self, tc, last_good: "Path | None", skip_infinite_grads: bool = False):
        self.grad_factor, self.param_factor = tc.guard_grad_factor, tc.guard_param_factor
        self.skip_infinite_grads = skip_infinite_grads
        self.last_good = last_good
        self.history: collections.deque = collections.deque(maxlen=WINDOW)
        self.pending: "tuple[torch.Tensor, int] | None" = None
        self.start_norm: "float | None" = None

    def start(self, parameters) -> None:
        """Remember the parameter norm the run starts from (after any resume)."""
        self.start_norm = float(_norm(list(parameters)))

    def check_loss(self, loss: torch.Tensor, step: int, reduce, what: str = "loss") -> None:
        """`reduce`: sums a [1] tensor over the processes (accelerator.reduce), so that all of them stop."""
        bad = reduce((~torch.isfinite(loss.detach().float())).float().reshape(1), reduction="sum")
        if bad.item() > 0:
            self.stop(f"{what} is {loss.item()} at step {step}")
        self.check_pending()

    def observe_grad_norm(self, grad_norm: "torch.Tensor | float | None", step: int) -> None:
        """The gradient norm of `step`, checked at the next loss check or checkpoint."""
        self.check_pending()
        if grad_norm is not None:
            self.pending = (torch.as_tensor(grad_norm).detach(), step)

    def check_pending(self) -> None:
        if self.pending is None:
            return
        value, step = float(self.pending[0]), self.pending[1]
        self.pending = None
        if not math.isfinite(value):
            if self.skip_infinite_grads:
                return
            self.stop(f"the gradient norm is {value} at step {step}")
        if self.grad_factor > 0 and len(self.history) >= MIN_HISTORY:
            median = statistics.median(self.history)
            if value > self.grad_factor * median:
                self.stop(f"the gradient norm exploded at step {step}: {value:.4g}, over train.guard_grad_factor "
                          f"{self.grad_factor:g} x the recent median {median:.4g}")
        self.history.append(value)

    @torch.no_grad()
    def check_before_save(self, model: torch.nn.Module, ema_model: "torch.nn.Module | None", step: int) -> None:
        """Raise unless the weights about to be saved after `step` steps are finite and not exploded."""
        self.check_pending()
        for name, module in (("trained", model), ("EMA", ema_model)):
            if module is None:
                continue
            for key, p in module.named_parameters():
                if not bool(torch.isfinite(p).all()):
                    self.stop(f"the {name} weights hold NaN or infinite values ({key}) after step {step}")
        norm = float(_norm(list(model.parameters())))
        if self.param_factor > 0 and self.start_norm and norm > self.param_factor * self.start_norm:
            self.stop(f"the weights exploded after step {step}: parameter norm {norm:.4g}, over "
                      f"train.guard_param_factor {self.param_factor:g} x {self.start_norm:.4g} at the start")

    def saved(self, checkpoint: "Path | None") -> None:
        """After a checkpoint write (None: written by another process)."""
        if checkpoint is not None:
            self.last_good = checkpoint

    def stop(self, what: str) -> None:
        raise TrainingDiverged(f"{what}; stopped without saving. Last good checkpoint: {self.last_good or 'none'}. "
                               "Try a lower train.lr, train.grad_clip, or train.mixed_precision=no")


def _norm(parameters: list) -> torch.Tensor:
    if not parameters:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([p.detach().float().norm() for p in parameters]))
