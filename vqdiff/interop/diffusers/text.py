"""CLIPTextEncoder (open_clip names, CLIP's BPE) <-> transformers CLIPTextModel + CLIPTokenizer, built offline from
open_clip's own vocabulary."""

import copy
import json
from pathlib import Path

import torch
from torch import nn

from ...models.text import CUSTOM_TEXT_TOWERS, PAD_ID, CLIPTextEncoder, TextBackend, sized_text_arch
from .common import DiffusersConversionError, load_exactly

CLIP_VOCAB_SIZE = 49408  # open_clip's BPE: 256 bytes, 256 word-final bytes, 48,894 merges, start and end of text
PAD_TOKEN = "<|pad|>"  # an extra token whose embedding is row 0: pads like vqdiff without splitting "!" out of text
CLIP_ACTIVATIONS = {"GELU": "gelu", "QuickGELU": "quick_gelu"}  # open_clip MLP module class -> HF hidden_act
# erf-GELU open_clip text towers an imported CLIPTextModel may become, by (width, layers, heads); any QuickGELU
# size has one (text.sized_text_arch)
GELU_TEXT_TOWERS = {
    **{(c["width"], c["layers"], c["heads"]): name for name, c in CUSTOM_TEXT_TOWERS.items()},
    (512, 12, 8): "ViT-B-32", (768, 12, 12): "ViT-L-14", (1024, 24, 16): "ViT-H-14",
}


def clip_vocabulary(simple_tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """open_clip's SimpleTokenizer (its bpe_simple_vocab_16e6.txt.gz) -> the HF vocabulary and merges, in rank order."""
    special = {simple_tokenizer.sot_token_id: "<|startoftext|>", simple_tokenizer.eot_token_id: "<|endoftext|>"}
    vocab = {special.get(i, token): i for token, i in simple_tokenizer.encoder.items()}
    return vocab, sorted(simple_tokenizer.bpe_ranks, key=simple_tokenizer.bpe_ranks.get)


def hf_prefix(model) -> str:
    """transformers 5 keeps CLIPTextModel's parts at the top; earlier versions under `text_model`."""
    return "text_model." if hasattr(model, "text_model") else ""


def open_clip_to_hf(state: dict, layers: int, prefix: str) -> dict:
    """open_clip text-tower names -> CLIPTextModel names (the fused in_proj split into q, k, v)."""
    out = {f"{prefix}embeddings.token_embedding.weight": state.pop("token_embedding.weight"),
           f"{prefix}embeddings.position_embedding.weight": state.pop("positional_embedding")}
    for p in ("weight", "bias"):
        out[f"{prefix}final_layer_norm.{p}"] = state.pop(f"ln_final.{p}")
        for i in range(layers):
            src, dst = f"transformer.resblocks.{i}.", f"{prefix}encoder.layers.{i}."
            for q, kv in zip("qkv", state.pop(f"{src}attn.in_proj_{p}").chunk(3)):
                out[f"{dst}self_attn.{q}_proj.{p}"] = kv
            for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                 ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{dst}{theirs}.{p}"] = state.pop(f"{src}{ours}.{p}")
    state.pop("text_projection", None)  # after the pooled token only: the per-token features never use it
    if state:
        raise DiffusersConversionError(f"the open_clip text tower has parts CLIPTextModel lacks: {sorted(state)[:8]}")
    return out


def hf_to_open_clip(state: dict, layers: int, prefix: str) -> dict:
    out = {"token_embedding.weight": state[f"{prefix}embeddings.token_embedding.weight"],
           "positional_embedding": state[f"{prefix}embeddings.position_embedding.weight"]}
    for p in ("weight", "bias"):
        out[f"ln_final.{p}"] = state[f"{prefix}final_layer_norm.{p}"]
        for i in range(layers):
            dst, src = f"transformer.resblocks.{i}.", f"{prefix}encoder.layers.{i}."
            out[f"{dst}attn.in_proj_{p}"] = torch.cat([state[f"{src}self_attn.{q}_proj.{p}"] for q in "qkv"])
            for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                 ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{dst}{ours}.{p}"] = state[f"{src}{theirs}.{p}"]
    return out


def text_to_diffusers(encoder: CLIPTextEncoder):
    """(CLIPTextModel whose last hidden state equals `encoder.token_features`, CLIPTokenizer giving our ids)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    if not encoder.normalize:
        raise DiffusersConversionError("the text encoder does not L2-normalise its features (text.normalize: "
                                       "false); diffusers' VQDiffusionPipeline always does. Train with "
                                       "text.normalize: true and a text.feature_scale instead")
    if encoder.backend is TextBackend.HF:
        model, tokenizer = copy.deepcopy(encoder.tower).float(), copy.deepcopy(encoder.tokenizer)
        tokenizer.model_max_length = encoder.context_length
        if not pads_like_vqdiff(model, tokenizer.pad_token_id):
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
            pad_like_vqdiff(model, tokenizer.pad_token_id)
        return model.eval(), tokenizer
    tower = encoder.tower
    block = tower.transformer.resblocks[0]
    activation = CLIP_ACTIVATIONS.get(type(block.mlp.gelu).__name__)
    if activation is None or getattr(block.mlp.gelu, "approximate", "none") != "none":
        raise DiffusersConversionError(f"the text tower's MLP activation {block.mlp.gelu} has no CLIPTextModel "
                                       "hidden_act (gelu or quick_gelu)")
    if not isinstance(block.attn, nn.MultiheadAttention) or tower.attn_mask is None:
        raise DiffusersConversionError("the text tower is not a causal nn.MultiheadAttention CLIP transformer")
    if block.ln_1.eps != tower.ln_final.eps:
        raise DiffusersConversionError("the text tower's layer norms use different eps; CLIPTextModel has one")
    layers, width = len(tower.transformer.resblocks), tower.transformer.width
    config = CLIPTextConfig(
        vocab_size=tower.token_embedding.num_embeddings, hidden_size=width,
        intermediate_size=block.mlp.c_fc.out_features, num_hidden_layers=layers,
        num_attention_heads=block.attn.num_heads, max_position_embeddings=encoder.context_length,
        hidden_act=activation, layer_norm_eps=block.ln_1.eps, projection_dim=width, pad_token_id=PAD_ID,
        bos_token_id=encoder.tokenizer.sot_token_id, eos_token_id=encoder.tokenizer.eot_token_id)
    model = CLIPTextModel(config)
    state = {k: v.float() for k, v in tower.state_dict().items()}
    state["positional_embedding"] = state["positional_embedding"][:encoder.context_length]
    load_exactly(model, open_clip_to_hf(state, layers, hf_prefix(model)), "the text tower in CLIPTextModel")
    vocab, merges = clip_vocabulary(encoder.tokenizer)
    vocab[PAD_TOKEN] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=PAD_TOKEN,
                              model_max_length=encoder.context_length)
    pad_like_vqdiff(model, tokenizer.pad_token_id)
    return model.eval(), tokenizer


def pads_like_vqdiff(model, pad_id: int | None) -> bool:
    """Whether the pad token's embedding is that of id 0, so its features are the ones vqdiff's padding gives."""
    weight = model.get_input_embeddings().weight
    return pad_id is not None and pad_id < len(weight) and torch.equal(weight[pad_id], weight[PAD_ID])


def pad_like_vqdiff(model, pad_id: int) -> None:
    """vqdiff pads with id 0 ("!"); the tokenizer's own pad token gets a copy of that embedding."""
    if pad_id != model.config.vocab_size:
        raise DiffusersConversionError(f"the pad token got id {pad_id}, expected {model.config.vocab_size}")
    model.resize_token_embeddings(pad_id + 1, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[pad_id] = model.get_input_embeddings().weight[PAD_ID]


def text_from_diffusers(model, tokenizer) -> tuple[CLIPTextEncoder, str]:
    """(CLIPTextEncoder with open_clip names and CLIP's BPE, its arch) for a CLIPTextModel + CLIPTokenizer."""
    c = model.config
    size = (c.hidden_size, c.num_hidden_layers, c.num_attention_heads)
    arch = sized_text_arch(*size) if c.hidden_act == "quick_gelu" else GELU_TEXT_TOWERS.get(size)
    if arch is None or c.hidden_act not in CLIP_ACTIVATIONS.values() or c.intermediate_size != 4 * c.hidden_size \
            or c.layer_norm_eps != 1e-5:
        raise DiffusersConversionError(
            f"no open_clip text tower has this CLIPTextModel's layout (width {c.hidden_size}, {c.num_hidden_layers} "
            f"layers, {c.num_attention_heads} heads, {c.hidden_act}, MLP {c.intermediate_size}, eps "
            f"{c.layer_norm_eps}); vqdiff has any size with quick_gelu, MLP 4x and eps 1e-5, and erf-GELU towers "
            f"{sorted(GELU_TEXT_TOWERS.values())}")
    state, prefix = model.state_dict(), hf_prefix(model)
    embedding = state[f"{prefix}embeddings.token_embedding.weight"]
    if not pads_like_vqdiff(model, tokenizer.pad_token_id):
        raise DiffusersConversionError(f"the tokenizer pads with {tokenizer.pad_token!r} (id "
                                       f"{tokenizer.pad_token_id}), whose embedding is not that of id {PAD_ID}; "
                                       f"vqdiff pads with id {PAD_ID}")
    state[f"{prefix}embeddings.token_embedding.weight"] = embedding[:CLIP_VOCAB_SIZE]  # extra rows: pads
    tower = hf_to_open_clip(state, c.num_hidden_layers, prefix)
    if arch not in CUSTOM_TEXT_TOWERS:  # after the pooled token only, so CLIPTextModel drops it
        tower["text_projection"] = torch.zeros(c.hidden_size, c.hidden_size)
    try:
        encoder = CLIPTextEncoder(arch=arch, weights=tower, context_length=c.max_position_embeddings)
    except ValueError as error:
        raise DiffusersConversionError(f"the CLIPTextModel does not fit open_clip {arch}: {error}") from error
    vocab, _ = clip_vocabulary(encoder.tokenizer)
    theirs = tokenizer.get_vocab()
    if any(theirs.get(token) != i for token, i in vocab.items()):
        raise DiffusersConversionError("the tokenizer's vocabulary is not CLIP's BPE vocabulary (open_clip "
                                       "bpe_simple_vocab_16e6), the only one vqdiff's text encoder has")
    return encoder.eval(), arch


def write_bpe_files(directory: Path) -> None:
    """vocab.json and merges.txt beside tokenizer.json, for transformers versions whose CLIPTokenizer reads those."""
    model = json.loads((directory / "tokenizer.json").read_text())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (directory / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges), encoding="utf-8")
