"""Released VQ-Diffusion checkpoints (microsoft/VQ-Diffusion: COCO, CUB-200, CC, their "learnable" variants, ITHQ)
-> vqdiff parts.

A released `.pth` is a dict with `model` (the whole DALLE state dict) and `ema` (the DiffusionTransformer's,
without the leading `transformer.`), plus training state. The transformer's keys, under
`transformer.transformer.` in `model` and `transformer.` in `ema`, already carry DiffusionTransformer's names:

    content_emb.{emb, height_emb, width_emb}.weight
    blocks.{i}.{ln1, ln1_1}.{emb.weight [T, D], linear.weight [2D, D], linear.bias}   (per-step AdaLN tables)
    blocks.{i}.{attn1, attn2}.{query, key, value, proj}.{weight, bias}; blocks.{i}.attn2.mask (unused buffer)
    blocks.{i}.ln2.{weight, bias}, blocks.{i}.mlp.{0, 2}.{weight, bias}
    to_logits.{0, 1}.{weight, bias}
    empty_text_embed [77, 512] float64, beside the network (learnable classifier-free files only)

The released network is DiffusionTransformer with `time_embedding="table"`, `mlp_activation="quick_gelu"` and
`mask_text_padding=False` (it attends over all 77 text positions); sizes are read from the shapes.
"""

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

from ..models.transformer import DiffusionTransformer
from ..models.vqvae import GumbelVQVAE
from .taming import load_taming_gumbel

NETWORK_PREFIXES = ("transformer.transformer.", "transformer.", "")  # whole model, EMA dict, bare network
UNUSED_SUFFIXES = (".attn2.mask",)  # a causal-mask buffer that the forward never reads (76 MiB in a B file)


class OfficialCheckpointError(ValueError):
    """A released checkpoint that cannot be read, or whose keys do not fit the expected layout."""


def read_checkpoint(path: "str | Path", trust_pickle: bool = False) -> dict:
    """The checkpoint's dict, read with `weights_only=True` (plain tensors and containers only).

    `trust_pickle=True` unpickles arbitrary objects (it can run code from the file): only for files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise OfficialCheckpointError(f"no checkpoint file at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=True)
    except (pickle.UnpicklingError, RuntimeError) as error:
        if trust_pickle:
            raise
        raise OfficialCheckpointError(
            f"{path} holds Python objects beside its tensors, so it cannot be read safely (weights_only=True). "
            f"If you trust the file, pass --trust-pickle (trust_pickle=True), which unpickles it in full") from error


def network_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """(the network's tensors under DiffusionTransformer names, the learned null text embedding or None) from a
    whole-model dict, an EMA dict or a bare network dict; unused buffers dropped."""
    for prefix in NETWORK_PREFIXES:
        if f"{prefix}content_emb.emb.weight" in state:
            break
    else:
        raise OfficialCheckpointError("no `content_emb.emb.weight` under `transformer.transformer.`, `transformer.` "
                                      "or at the top level: not a VQ-Diffusion transformer state dict")
    top = prefix[: -len("transformer.")] if prefix else ""  # where empty_text_embed sits beside the network
    network = {key[len(prefix):]: value for key, value in state.items()
               if key.startswith(prefix) and not key.endswith(UNUSED_SUFFIXES)
               and not key[len(prefix):].startswith(("condition_emb.", "log_", "Lt_", "empty_text_embed"))}
    return network, state.get(f"{top}empty_text_embed")


def load_transformer(state: Mapping[str, torch.Tensor], num_heads: int = 16) -> DiffusionTransformer:
    """A DiffusionTransformer holding a released network, float32, sizes inferred from the tensors.

    Accepts the whole-model dict (`ckpt["model"]`), the EMA dict (`ckpt["ema"]`) or a bare network dict.
    The released models use 16 heads, which the tensors do not record.
    """
    network, null_text = network_state(state)
    emb = network["content_emb.emb.weight"]
    num_classes, width = emb.shape[0] - 1, emb.shape[1]
    num_layers = len({key.split(".")[1] for key in network if key.startswith("blocks.")})
    try:
        model = DiffusionTransformer(
            num_classes, width, num_layers, num_heads,
            grid_size=(network["content_emb.height_emb.weight"].shape[0],
                       network["content_emb.width_emb.weight"].shape[0]),
            text_dim=network["blocks.0.attn2.key.weight"].shape[1],
            text_length=77 if null_text is None else null_text.shape[0],
            num_steps=network["blocks.0.ln1.emb.weight"].shape[0],
            time_embedding="table", mlp_activation="quick_gelu",
            mlp_ratio=network["blocks.0.mlp.0.weight"].shape[0] / width,
            mask_text_padding=False, null_text_embedding=null_text is not None)
    except KeyError as error:
        raise OfficialCheckpointError(f"the transformer state dict lacks {error.args[0]}") from error
    if null_text is not None:
        network["empty_text_embed"] = null_text
    _load_exactly(model, network, "released transformer")
    return model


CODEC_PREFIXES = ("content_codec.enc.", "content_codec.dec.")  # the quantizer is stored under both


def load_codec(state: Mapping[str, torch.Tensor], codes_map: "torch.Tensor | str | Path | None" = None,
               config: Mapping | None = None) -> GumbelVQVAE:
    """The Gumbel f8 codec of a COCO/CUB/CC file (`ckpt["model"]`) as a GumbelVQVAE, trimmed by `codes_map`.

    `codes_map` is the released full-to-trimmed table (`taming_vqvae_2887.pt`: int64 [8192], the used codes
    mapped to 1..2886 in increasing order, every other code to 0), or a path to it. Trimmed id j decodes as
    the first full code mapped to j, as in the released code (so id 0 is full code 0). Encoding takes the
    argmax over the kept codes; the released encoder draws a Gumbel sample over all 8192 and maps unused
    codes to 0. `config` overrides GUMBEL_F8_CONFIG (for other sizes).
    """
    codec: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(CODEC_PREFIXES):
            name = key.split(".", 2)[2]
            if name in codec and not torch.equal(codec[name], value):
                raise OfficialCheckpointError(f"the codec's two copies of {name} differ")
            codec[name] = value
    if not codec:
        raise OfficialCheckpointError("no `content_codec.enc.*` / `content_codec.dec.*` tensors: not a whole-model "
                                      "state dict of a COCO/CUB/CC file (ckpt['model'], not ckpt['ema'])")
    model = load_taming_gumbel({k: v.float() for k, v in codec.items()}, config)
    if codes_map is None:
        return model
    if not isinstance(codes_map, torch.Tensor):
        codes_map = torch.load(codes_map, map_location="cpu", weights_only=True)
    codes_map = torch.as_tensor(codes_map).long().flatten()
    if codes_map.shape != (model.codebook_size,):
        raise OfficialCheckpointError(f"codes_map must map all {model.codebook_size} codes, got {codes_map.numel()}")
    ids = int(codes_map.max()) + 1
    order = torch.argsort(codes_map * model.codebook_size + torch.arange(model.codebook_size))  # by id, then code
    first = order[torch.searchsorted(codes_map[order], torch.arange(ids))]
    if not torch.equal(codes_map[first], torch.arange(ids)):
        raise OfficialCheckpointError(f"codes_map does not use every id in 0..{ids - 1}")
    return model.keep_codes(first)


def _load_exactly(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Copy every tensor (cast to the module's dtype) or fail naming the missing, unexpected and misshapen keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshapen = [f"{key} {list(state[key].shape)} (expected {list(own[key].shape)})"
                 for key in sorted(set(own) & set(state)) if state[key].shape != own[key].shape]
    if missing or unexpected or misshapen:
        parts = [f"{name}: {', '.join(keys[:20])}{' ...' if len(keys) > 20 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen))
                 if keys]
        raise OfficialCheckpointError(f"{what} does not fit: " + "; ".join(parts))
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(state[key])
