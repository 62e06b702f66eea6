"""taming-transformers Gumbel VQGAN checkpoints (`GumbelVQ`, e.g. the "Gumbel f8" model) <-> GumbelVQVAE.

GumbelVQVAE uses taming's parameter names, so after reading the file the map is the identity plus checks.
Expected names (L = len(ch_mult) levels, R = num_res_blocks; every conv/norm has .weight and .bias):

    encoder.conv_in
    encoder.down.{0..L-1}.block.{0..R-1}.{norm1,conv1,norm2,conv2}   (+ .nin_shortcut where the width changes)
    encoder.down.{i}.attn.{0..R-1}.{norm,q,k,v,proj_out}             (levels at an attention resolution)
    encoder.down.{0..L-2}.downsample.conv
    encoder.mid.{block_1,attn_1,block_2}, encoder.norm_out, encoder.conv_out
    decoder.conv_in, decoder.mid.{block_1,attn_1,block_2}
    decoder.up.{0..L-1}.block.{0..R}.*, decoder.up.{i}.attn.{0..R}.*  (up.0 = full resolution; up.{L-1} runs first)
    decoder.up.{1..L-1}.upsample.conv, decoder.norm_out, decoder.conv_out
    quant_conv, quantize.proj, quantize.embed.weight [K, D], post_quant_conv

`loss.*` (taming's discriminator and LPIPS) is ignored. The published f8 model has 301 such tensors
(GUMBEL_F8_CONFIG; the project's shared notes list them with shapes in interop/taming_gumbel_f8_keys.tsv).
"""

import logging
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

from ..models.loading import load_exactly
from ..models.vqvae import GUMBEL_F8_CONFIG, GumbelVQVAE

log = logging.getLogger(__name__)
IGNORED_PREFIXES = ("loss.",)


class TamingKeyError(KeyError):
    """A taming state dict whose names or shapes do not fit the GumbelVQVAE config."""

    def __str__(self) -> str:
        return str(self.args[0])


def read_taming_state_dict(path_or_state_dict: "str | Path | Mapping") -> dict[str, torch.Tensor]:
    """A `.ckpt` (a dict holding `state_dict`) or a bare state dict, read with weights_only=True."""
    if isinstance(path_or_state_dict, Mapping):
        state = path_or_state_dict
    else:
        try:
            state = torch.load(path_or_state_dict, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(f"{path_or_state_dict} holds objects other than tensors and plain containers, so it "
                             f"cannot be read with weights_only=True; re-save only its `state_dict` from a trusted "
                             f"copy") from error
    if "state_dict" in state:
        state = state["state_dict"]
    return dict(state)


def from_taming_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """taming GumbelVQ names -> GumbelVQVAE names (identical), without `loss.*`."""
    ignored = [k for k in state if k.startswith(IGNORED_PREFIXES)]
    if ignored:
        log.info("ignoring %d taming loss.* tensors (discriminator, LPIPS)", len(ignored))
    return {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}


def to_taming_state_dict(model: GumbelVQVAE) -> dict[str, torch.Tensor]:
    """GumbelVQVAE -> a state dict that taming's GumbelVQ loads. Untrimmed models only: taming has no code map."""
    if model.code_map is not None:
        raise ValueError("a trimmed tokenizer has no taming equivalent (taming keeps no code map); export the "
                         "untrimmed model and store code_map separately")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def load_taming_gumbel(path_or_state_dict: "str | Path | Mapping", config: Mapping | None = None) -> GumbelVQVAE:
    """A GumbelVQVAE (eval mode) with taming Gumbel VQGAN weights; `config` defaults to the published f8
    architecture (GUMBEL_F8_CONFIG). Raises TamingKeyError listing every missing, unexpected or mis-shaped name."""
    state = from_taming_state_dict(read_taming_state_dict(path_or_state_dict))
    model = GumbelVQVAE.from_config({**GUMBEL_F8_CONFIG, **(config or {})})
    load_exactly(model, state, "the taming state dict", TamingKeyError)
    return model.eval()
