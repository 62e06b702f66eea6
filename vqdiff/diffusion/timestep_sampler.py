"""Which timesteps to train on, and the weights that keep the loss an unbiased estimate of the VLB.

`sample(batch_size, device, generator=None) -> (t, weights)`; the trainer multiplies the per-sample
loss by `weights` and calls `update(t, losses)` with the unweighted per-sample losses.
"""

import torch
import torch.distributed as dist


class UniformSampler:
    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def probabilities(self) -> torch.Tensor:
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(self, batch_size: int, device="cpu", generator: torch.Generator | None = None):
        gen_device = generator.device if generator is not None else "cpu"
        p = self.probabilities().to(gen_device)
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p[t])
        return t.to(device), weights.float().to(device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Uniform sampling keeps no statistics."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore."""


class ImportanceSampler(UniformSampler):
    """p(t) proportional to sqrt(E[L_t^2]), mixed with a uniform floor (Nichol & Dhariwal 2021, Sec. 3.3).

    E[L_t^2] is either the mean of the last `history` losses seen at t (improved-diffusion) or, with
    `ema_decay`, an exponential moving average (VQ-Diffusion: decay 0.9). Sampling stays uniform until
    every t has `history` observations. Under torch.distributed every process gathers all (t, loss)
    pairs, so the statistics stay identical on every rank.
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001,
                 ema_decay: float | None = None):
        super().__init__(num_timesteps)
        self.history = history
        self.uniform_prob = uniform_prob
        self.ema_decay = ema_decay
        self.loss_history = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.count = torch.zeros(num_timesteps, dtype=torch.long)
        self.ema_second_moment = torch.zeros(num_timesteps, dtype=torch.float64)

    def warmed_up(self) -> bool:
        return bool((self.count >= self.history).all())

    def second_moment(self) -> torch.Tensor:
        if self.ema_decay is not None:
            return self.ema_second_moment
        return (self.loss_history ** 2).mean(dim=1)

    def probabilities(self) -> torch.Tensor:
        p = torch.sqrt(self.second_moment())
        if not self.warmed_up() or not p.sum() > 0:  # all-zero losses carry no preference
            return super().probabilities()
        p = p / p.sum()
        return p * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        t, losses = _gather_across_processes(t.detach(), losses.detach())
        for step, loss in zip(t.tolist(), losses.double().tolist()):
            slot = self.count[step] % self.history
            self.loss_history[step, slot] = loss
            if self.ema_decay is None or self.count[step] == 0:
                self.ema_second_moment[step] = loss ** 2
            else:
                self.ema_second_moment[step] = (self.ema_decay * self.ema_second_moment[step]
                                                + (1 - self.ema_decay) * loss ** 2)
            self.count[step] += 1

    def state_dict(self) -> dict:
        return {"loss_history": self.loss_history.clone(), "count": self.count.clone(),
                "ema_second_moment": self.ema_second_moment.clone()}

    def load_state_dict(self, state: dict) -> None:
        for name in ("loss_history", "count", "ema_second_moment"):
            if name not in state:
                raise KeyError(f"ImportanceSampler state is missing {name!r}")
            current = getattr(self, name)
            if state[name].shape != current.shape:
                raise ValueError(f"ImportanceSampler state {name!r} has shape {tuple(state[name].shape)}, "
                                 f"expected {tuple(current.shape)} (different num_timesteps or history?)")
            current.copy_(state[name])


def _gather_across_processes(t: torch.Tensor, losses: torch.Tensor):
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t.cpu(), losses.cpu()
    pairs = torch.stack([t.double(), losses.double()]).to(losses.device)  # [2, B]
    gathered = [torch.empty_like(pairs) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, pairs)
    everything = torch.cat(gathered, dim=1).cpu()
    return everything[0].round().long(), everything[1]
