"""Tensor helpers of the Gaussian process: schedule-table lookups, noise draws that follow a generator, the
sampling device."""

import torch

def extract(table: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """table[t] in x's dtype and device, broadcast to x's shape."""
    dtype = x.dtype if x.is_floating_point() else torch.float32
    values = table.to(device=x.device, dtype=dtype)[t.to(x.device)]  # [B]
    return values.reshape(-1, *([1] * (x.ndim - 1))).expand(x.shape)


def nonzero(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """1 where t > 0, 0 at the last step, shaped to broadcast against x."""
    return (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def noise_like(x: torch.Tensor, noise: torch.Tensor | None, generator: torch.Generator | None):
    """`noise` after a shape check, or a fresh standard normal draw shaped like x."""
    if noise is None:
        return randn(x.shape, generator, x.device, x.dtype)
    if noise.shape != x.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(x.shape)}")
    return noise


def randn(shape, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    """Standard normal draws made on the generator's device, so a CPU generator also drives a GPU run."""
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)


def check_timesteps(t: torch.Tensor, x: torch.Tensor) -> None:
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"timesteps t must have shape [B] = [{x.shape[0]}], got {tuple(t.shape)}")


def sample_device(device, noise, model, cond: dict) -> torch.device:
    """The given device, else the noise's, the network's parameters', the first conditioning tensor's, or CPU."""
    if device is not None:
        return torch.device(device)
    if noise is not None:
        return noise.device
    parameter = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    if parameter is not None:
        return parameter.device
    tensors = [v for v in cond.values() if isinstance(v, torch.Tensor)]
    return tensors[0].device if tensors else torch.device("cpu")
