"""Strict state-dict loading with an error that names every key that does not fit."""

from collections.abc import Mapping

import torch
from torch import nn

MAX_LISTED = 20  # per kind; a wrong config can mismatch hundreds of keys


def load_exactly(module: nn.Module, state: Mapping[str, torch.Tensor], what: str,
                 error: type[Exception] = ValueError, assign: bool = False) -> None:
    """Copy every tensor of `state` into `module` (cast to the module's dtypes), or raise `error` listing the
    missing, unexpected and mis-shaped keys. A module on the meta device only has its keys and shapes checked.
    `assign=True` makes the (cast) tensors of `state` the module's own instead of copying them: a module built on
    the meta device then holds no second copy of the weights."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshapen = [f"{key}: file {list(state[key].shape)} vs model {list(own[key].shape)}"
                 for key in sorted(set(own) & set(state)) if state[key].shape != own[key].shape]
    if missing or unexpected or misshapen:
        lines = [f"{what} does not fit {type(module).__name__}:"]
        for kind, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", misshapen)):
            lines += [f"  {kind}: {key}" for key in keys[:MAX_LISTED]]
            if len(keys) > MAX_LISTED:
                lines.append(f"  ... and {len(keys) - MAX_LISTED} more {kind}")
        raise error("\n".join(lines))
    if assign:
        module.load_state_dict({key: state[key].to(tensor.dtype) for key, tensor in own.items()}, assign=True)
        return
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(state[key])
