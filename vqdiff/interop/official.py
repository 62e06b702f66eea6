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
`mask_text_padding=False` (it attends over all 77 text positions); sizes are read from the shapes. Beside it,
`condition_emb.*` holds OpenAI's CLIP ViT-B/32 text tower in open_clip names (float16 linears), and `model` alone
holds the codec under `content_codec.{enc,dec}.*`: taming's Gumbel f8 VQGAN (COCO/CUB/CC, trimmed by a separate
codes map) or ITHQ's PatchVQGAN. `official_pipeline` wraps the parts in a TextToImagePipeline (`vqdiff convert
official` saves it).
"""

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

from ..config import ExperimentConfig, ModelType, Network
from ..models.conditioned import TextConditioned
from ..models.loading import load_exactly
from ..models.patch_vqgan import PatchVQGAN
from ..models.text import CLIPTextEncoder, text_encoder_from_state_dict
from ..models.transformer import DiffusionTransformer
from ..models.vqvae import GUMBEL_F8_CONFIG, GumbelVQVAE
from ..pipeline.text_to_image import TextToImagePipeline
from .taming import TamingKeyError, load_taming_gumbel

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
    try:  # built on the meta device, then given the file's tensors: no random init, no second copy (B: 1.5 GB)
        with torch.device("meta"):
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
    load_exactly(model, network, "the released transformer", OfficialCheckpointError, assign=True)
    return model


TEXT_PREFIXES = ("transformer.condition_emb.", "condition_emb.")  # whole model, EMA dict


def load_text_encoder(state: Mapping[str, torch.Tensor], num_heads: int = 8) -> CLIPTextEncoder:
    """The released CLIP text tower as a frozen float32 CLIPTextEncoder (OpenAI's QuickGELU layout: the open_clip
    arch "ViT-B-32-quickgelu" at the released size), from the whole-model dict or the EMA dict.

    Sizes are read from the shapes; the number of heads is not recorded in them (ViT-B/32 has 8)."""
    for prefix in TEXT_PREFIXES:
        tower = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        if tower:
            break
    else:
        raise OfficialCheckpointError("no `transformer.condition_emb.*` (whole model) or `condition_emb.*` (EMA) "
                                      "tensors: no CLIP text tower in this state dict")
    try:
        return text_encoder_from_state_dict(tower, num_heads)
    except ValueError as error:
        raise OfficialCheckpointError(f"the released CLIP text tower: {error}") from error


CODEC_PREFIXES = ("content_codec.enc.", "content_codec.dec.")  # the quantizer is stored under both
EMA_CODEBOOK_STATS = ("quantize.cluster_size", "quantize.embedding_avg")  # ITHQ codebook training only


def codec_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The codec's tensors under the model's own names, the shared quantizer once, training statistics dropped."""
    codec: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(CODEC_PREFIXES):
            name = key.split(".", 2)[2]
            if name in EMA_CODEBOOK_STATS:
                continue
            if name in codec and not value.is_meta and not torch.equal(codec[name], value):  # meta: shapes only
                raise OfficialCheckpointError(f"the codec's two copies of {name} differ")
            codec[name] = value
    if not codec:
        raise OfficialCheckpointError("no `content_codec.enc.*` / `content_codec.dec.*` tensors: not a whole-model "
                                      "state dict of a released file (ckpt['model'], not ckpt['ema'])")
    return codec


def codec_layout(codec: Mapping[str, torch.Tensor]) -> dict:
    """The taming Encoder/Decoder sizes that the codec's shapes record (GroupNorm has 32 groups throughout taming)."""
    try:
        ch, in_channels = codec["encoder.conv_in.weight"].shape[:2]
        levels = sorted({int(key.split(".")[2]) for key in codec if key.startswith("encoder.down.")})
        resolution = 32 * 2 ** (len(levels) - 1)  # only where attention sits depends on it; 256 for the released
        return dict(
            resolution=resolution, in_channels=in_channels, out_channels=codec["decoder.conv_out.weight"].shape[0],
            ch=ch, ch_mult=[codec[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels],
            num_res_blocks=len({key.split(".")[4] for key in codec if key.startswith("encoder.down.0.block.")}),
            attn_resolutions=[resolution >> i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in codec],
            z_channels=codec["encoder.conv_out.weight"].shape[0], dropout=0.0, norm_groups=32)
    except KeyError as error:
        raise OfficialCheckpointError(f"the codec state dict lacks {error.args[0]}") from error


def load_codec(state: Mapping[str, torch.Tensor], codes_map: "torch.Tensor | str | Path | None" = None,
               config: Mapping | None = None) -> GumbelVQVAE:
    """The Gumbel f8 codec of a COCO/CUB/CC file (`ckpt["model"]`) as a GumbelVQVAE, trimmed by `codes_map`.

    `codes_map` is the released full-to-trimmed table (`taming_vqvae_2887.pt`: int64 [8192], the used codes
    mapped to 1..2886 in increasing order, every other code to 0), or a path to it. Trimmed id j decodes as
    the first full code mapped to j, as in the released code (so id 0 is full code 0). Encoding takes the
    argmax over the kept codes; the released encoder draws a Gumbel sample over all 8192 and maps unused
    codes to 0. Sizes are read from the shapes; `config` overrides them (e.g. norm_groups).
    """
    codec = codec_state(state)
    if "quantize.embed.weight" not in codec:
        raise OfficialCheckpointError("the codec has no Gumbel codebook `quantize.embed.weight` (ITHQ's PatchVQGAN "
                                      "loads with load_ithq_codec)")
    codebook = codec["quantize.embed.weight"]
    layout = dict(codec_layout(codec), num_embeddings=codebook.shape[0], embedding_dim=codebook.shape[1])
    try:
        model = load_taming_gumbel(codec, {**GUMBEL_F8_CONFIG, **layout, **(config or {})})
    except TamingKeyError as error:
        raise OfficialCheckpointError(str(error)) from error
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


def load_ithq_codec(state: Mapping[str, torch.Tensor], config: Mapping | None = None) -> PatchVQGAN:
    """ITHQ's PatchVQGAN (`ckpt["model"]` of ithq_learnable.pth) in eval mode; no trimming. Sizes are read from the
    shapes; `config` overrides them. The codebook's EMA statistics (cluster_size, embedding_avg) are dropped."""
    codec = codec_state(state)
    if "quantize.embedding" not in codec:
        raise OfficialCheckpointError("the codec has no nearest-neighbour codebook `quantize.embedding` (the Gumbel "
                                      "codec of COCO/CUB/CC files loads with load_codec)")
    codebook = codec["quantize.embedding"]
    layout = dict(codec_layout(codec), num_embeddings=codebook.shape[0], embedding_dim=codebook.shape[1])
    model = PatchVQGAN.from_config({**layout, **(config or {})})
    load_exactly(model, codec, "the ITHQ codec", OfficialCheckpointError)
    return model.eval()


# ---- a released file -> a TextToImagePipeline directory ------------------------------------------------------

WEIGHTS_CHOICES = ("ema", "model")


def load_official(ckpt_path: "str | Path", codes_map: "torch.Tensor | str | Path | None" = None,
                  weights: str = "ema", trust_pickle: bool = False):
    """(ExperimentConfig, codec, DiffusionTransformer, CLIPTextEncoder) of a released `.pth`.

    `weights="ema"` takes everything under `transformer.` (network, CLIP, null text) from the EMA copy, as the
    released inference does; "model" takes the trained weights. The codec always comes from `model`. COCO/CUB/CC
    files need `codes_map` (taming_vqvae_2887.pt) to fit their 2887-class transformer; ITHQ's codec is untrimmed.
    """
    if weights not in WEIGHTS_CHOICES:
        raise ValueError(f"weights must be one of {WEIGHTS_CHOICES}, got {weights!r}")
    checkpoint = read_checkpoint(ckpt_path, trust_pickle)
    missing = [entry for entry in dict.fromkeys(("model", weights)) if entry not in checkpoint]
    if missing:
        hint = "; convert the trained weights with --weights model" if missing == ["ema"] else ""
        raise OfficialCheckpointError(f"{ckpt_path} has no {' or '.join(missing)} entry (it holds "
                                      f"{', '.join(map(str, checkpoint))}){hint}")
    whole, source = checkpoint["model"], checkpoint[weights]
    network = load_transformer(source)
    text_encoder = load_text_encoder(source)
    if "quantize.embedding" in codec_names(whole):
        if codes_map is not None:
            raise OfficialCheckpointError("ITHQ's codec is not trimmed: it takes no codes map")
        tokenizer = load_ithq_codec(whole)
    else:
        tokenizer = load_codec(whole, codes_map)
    if tokenizer.num_embeddings != network.num_classes:
        hint = " (pass the released codes map, taming_vqvae_2887.pt)" if codes_map is None else ""
        raise OfficialCheckpointError(f"the codec has {tokenizer.num_embeddings} codes but the transformer predicts "
                                      f"{network.num_classes} classes{hint}")
    return pipeline_config(Path(ckpt_path).stem, tokenizer, network, text_encoder), tokenizer, network, text_encoder


def official_pipeline(checkpoint: "str | Path", codes_map: "torch.Tensor | str | Path | None" = None,
                      weights: str = "ema", trust_pickle: bool = False) -> TextToImagePipeline:
    """A released VQ-Diffusion `.pth` (COCO/CUB/CC with its codes map `taming_vqvae_2887.pt`, or ITHQ) as a
    pipeline (see load_official); `save_pretrained` then writes it as a vqdiff directory."""
    cfg, tokenizer, network, text_encoder = load_official(checkpoint, codes_map, weights, trust_pickle)
    return TextToImagePipeline.from_parts(cfg, tokenizer, TextConditioned(network, text_encoder))


def codec_names(state: Mapping[str, torch.Tensor]) -> set[str]:
    return {key.split(".", 2)[2] for key in state if key.startswith(CODEC_PREFIXES)}


def pipeline_config(name: str, tokenizer, network: DiffusionTransformer, text_encoder: CLIPTextEncoder):
    """The ExperimentConfig that rebuilds the converted parts (sampling defaults: the released README's)."""
    block = network.blocks[0]
    width = network.content_emb.emb.weight.shape[1]
    learned_null = network.empty_text_embed is not None
    cfg = ExperimentConfig(name=name, model=ModelType.VQ_DIFFUSION, network=Network.TRANSFORMER)
    cfg.data.name, cfg.data.size = "captions", network.grid_size[0] * tokenizer.downsample_factor
    cfg.tokenizer.path, cfg.vqvae.num_embeddings = "tokenizer", tokenizer.num_embeddings  # inside the directory
    cfg.text.arch, cfg.text.weights, cfg.text.trainable = text_encoder.arch, "text_encoder.safetensors", False
    cfg.text.context_length, cfg.text.normalize = text_encoder.context_length, text_encoder.normalize
    t = cfg.transformer
    t.num_layers, t.width, t.num_heads = len(network.blocks), width, block.attn1.num_heads
    t.time_embedding, t.mlp_activation, t.mask_text_padding = "table", "quick_gelu", False
    t.mlp_ratio = block.mlp[0].out_features / width
    t.null_text_embedding, t.text_drop_prob, t.dropout = learned_null, 0.1 if learned_null else 0.0, 0.0
    cfg.discrete.num_timesteps, cfg.discrete.schedule = block.ln1.num_steps, "released"
    # README: truncation 0.86 without guidance; with the learned null text, truncation 1.0 and guidance 5.0
    cfg.sample.truncation_rate, cfg.sample.guidance_scale = (1.0, 5.0) if learned_null else (0.86, 1.0)
    return cfg
