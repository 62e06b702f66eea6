"""CLIP text encoders: prompts -> per-token features [B, 77, D] and a key-padding mask [B, 77].

VQ-Diffusion conditions on every one of the 77 token positions of CLIP's last layer (after the final
layer norm, before the text projection), each L2-normalised. This is the only module that imports
open_clip or transformers. Weights come only from local files; nothing is fetched at run time.
"""

import logging
import re
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ..options import TextBackend
from .layers import cpu_autocast_attention
from .loading import load_exactly

logger = logging.getLogger(__name__)

# Small text towers with CLIP's BPE vocabulary, built directly for configs without pretrained weights.
CUSTOM_TEXT_TOWERS = {
    "clip-text-small": dict(width=256, layers=4, heads=4),
}
# OpenAI's CLIP ViT-B/32 with QuickGELU: the text tower of the released VQ-Diffusion models
OPENAI_TEXT_ARCH = "ViT-B-32-quickgelu"
# Other sizes of OpenAI's text layout (QuickGELU, MLP ratio 4, square text_projection):
# "clip-text-w{width}-l{layers}-h{heads}-quickgelu"
SIZED_TEXT_TOWER = re.compile(r"^clip-text-w(\d+)-l(\d+)-h(\d+)-quickgelu$")
OWN_PREFIX = "tower."  # a CLIPTextEncoder's own state dict (a pipeline directory's text_encoder.safetensors)
PAD_ID = 0  # open_clip and the released VQ-Diffusion pad with 0 after end-of-text, whatever the backend


class CLIPTextEncoder(nn.Module):
    """Tokenise prompts with CLIP's BPE and return (features [B, L, D], mask [B, L]).

    `mask` is True from start- through end-of-text (the real tokens) and False at the padding after it.
    `weights` is a local file (open_clip state dict .pt/.bin/.safetensors, OpenAI's TorchScript ViT-B-32.pt,
    or a CLIPTextEncoder's own .safetensors), a state dict of the open_clip tower, a local `transformers`
    CLIPTextModel directory for backend "hf", or "none" for a random initialisation. `arch` is an open_clip
    model name, a key of CUSTOM_TEXT_TOWERS or a SIZED_TEXT_TOWER name.
    A frozen encoder (`trainable=False`) runs in eval mode under no_grad and can cache features.
    """

    def __init__(self, backend: TextBackend | str = TextBackend.OPEN_CLIP, arch: str = "ViT-B-32",
                 weights: str | Path | Mapping[str, torch.Tensor] = "none", context_length: int = 77,
                 normalize: bool = True, trainable: bool = False, cache_size: int = 4096,
                 feature_scale: float = 1.0):
        super().__init__()
        self.backend, self.arch = TextBackend(backend), arch
        self.context_length, self.normalize, self.trainable = context_length, normalize, trainable
        if not feature_scale > 0:
            raise ValueError(f"text feature_scale must be positive, got {feature_scale}")
        self.feature_scale = feature_scale
        self.cache_size = cache_size
        self.cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        given = isinstance(weights, Mapping)
        random_init = not given and str(weights).lower() == "none"
        if not random_init and not given and not Path(weights).exists():
            raise FileNotFoundError(f"text encoder weights not found: {weights} (use weights='none' for random init)")
        if self.backend is TextBackend.HF:
            if random_init or given:
                raise ValueError("backend 'hf' needs weights = a local CLIPTextModel directory; use backend "
                                 "'open_clip' for a random-initialised encoder or one from a state dict")
            self.tower, self.tokenizer = load_hf(Path(weights))
            self.dim = self.tower.config.hidden_size
        else:
            state, file = (weights, None) if given else (None, None if random_init else Path(weights))
            if file is not None and (own := own_state_dict(file)) is not None:
                state, file = own, None  # a CLIPTextEncoder's own saved weights
            self.tower = build_open_clip(arch, file)
            if state is not None:
                load_exactly(self.tower, state, "the text tower's weights" if given else str(weights))
            self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
            self.dim = self.tower.transformer.width
            if self.tower.vocab_size != self.tokenizer.vocab_size:
                raise ValueError(f"arch {arch!r} has vocabulary {self.tower.vocab_size}, not CLIP's BPE "
                                 f"({self.tokenizer.vocab_size}); only CLIP-BPE text towers are supported")
        if not trainable:
            self.requires_grad_(False)
            self.eval()

    @property
    def eot_id(self) -> int:
        if self.backend is TextBackend.HF:
            return self.tokenizer.eos_token_id
        return self.tokenizer.eot_token_id

    def train(self, mode: bool = True):
        """A frozen encoder stays in eval mode."""
        return super().train(mode and self.trainable)

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> token ids [B, L] (padded with 0) and mask [B, L], True through end-of-text."""
        ids = torch.full((len(prompts), self.context_length), PAD_ID, dtype=torch.long)
        mask = torch.zeros(ids.shape, dtype=torch.bool)
        for i, prompt in enumerate(prompts):
            tokens = self.token_list(prompt)
            if len(tokens) > self.context_length:
                logger.warning("prompt truncated to %d tokens: %r", self.context_length, prompt)
                tokens = tokens[:self.context_length - 1] + [self.eot_id]  # end-of-text stays last, as in CLIP
            ids[i, :len(tokens)] = torch.tensor(tokens)
            mask[i, :len(tokens)] = True
        return ids, mask

    def token_list(self, prompt: str) -> list[int]:
        """One prompt -> [start-of-text, BPE tokens..., end-of-text], not truncated."""
        if self.backend is TextBackend.HF:
            return self.tokenizer(prompt)["input_ids"]
        return [self.tokenizer.sot_token_id] + self.tokenizer.encode(prompt) + [self.tokenizer.eot_token_id]

    def forward(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (features [B, L, D] float32, mask [B, L] bool) on the encoder's device."""
        prompts = check_prompts(prompts)
        ids, mask = self.tokenize(prompts)
        device = next(self.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            features = self.token_features(ids)
        if self.normalize:
            features = F.normalize(features, dim=-1)
        return features * self.feature_scale, mask

    def token_features(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, L] ids -> [B, L, D] hidden states after the final layer norm (causal attention, as in CLIP)."""
        with cpu_autocast_attention(ids.device):
            if self.backend is TextBackend.HF:
                return self.tower(input_ids=ids).last_hidden_state.float()
            tower = self.tower
            x = tower.token_embedding(ids) + tower.positional_embedding[:ids.shape[1]]
            x = tower.transformer(x, attn_mask=tower.attn_mask[:ids.shape[1], :ids.shape[1]])
            return tower.ln_final(x).float()

    def encode_cached(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Like forward, but a frozen encoder remembers each prompt's features (least recently used dropped).

        For a fixed caption set (training captions, a sample grid); a trainable encoder is never cached.
        """
        prompts = check_prompts(prompts)
        if self.trainable:
            return self(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        if missing:
            features, mask = self(missing)
            for prompt, f, m in zip(missing, features, mask):
                self.cache[prompt] = (f, m)
        for prompt in prompts:
            self.cache.move_to_end(prompt)
        rows = [self.cache[p] for p in prompts]
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return torch.stack([f for f, _ in rows]), torch.stack([m for _, m in rows])

    def _apply(self, fn, recurse=True):
        self.cache.clear()  # cached features live on the old device / dtype
        return super()._apply(fn, recurse)


def check_prompts(prompts: str | Sequence[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be strings, got {bad[:3]}")
    return prompts


def is_torchscript(path: Path) -> bool:
    """OpenAI's released CLIP files are TorchScript archives (a zip with a code/ folder)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())


def own_state_dict(path: Path) -> dict[str, torch.Tensor] | None:
    """The tower's tensors when `path` holds a CLIPTextEncoder's own state dict (keys "tower.*"), else None."""
    if path.suffix != ".safetensors":
        return None
    with safe_open(str(path), "pt") as file:
        keys = list(file.keys())
    if not keys or not all(key.startswith(OWN_PREFIX) for key in keys):
        return None
    return {key[len(OWN_PREFIX):]: value for key, value in load_file(str(path)).items()}


def sized_text_arch(width: int, layers: int, heads: int) -> str:
    """The arch name of an OpenAI-layout text tower: OPENAI_TEXT_ARCH at its size, else a SIZED_TEXT_TOWER name."""
    if (width, layers, heads) == (512, 12, 8):
        return OPENAI_TEXT_ARCH
    return f"clip-text-w{width}-l{layers}-h{heads}-quickgelu"


def text_encoder_from_state_dict(state: Mapping[str, torch.Tensor], num_heads: int = 8,
                                 normalize: bool = True) -> CLIPTextEncoder:
    """A frozen CLIPTextEncoder holding an OpenAI-layout text tower given in open_clip names (token_embedding,
    positional_embedding, transformer.resblocks.{i}.*, ln_final, text_projection), sizes read from the shapes.

    Any float dtype is accepted (the released files hold float16 linears); the encoder is float32. The number of
    heads is not recorded in the tensors: OpenAI's ViT-B/32 text tower has 8.
    """
    if "token_embedding.weight" not in state:
        raise ValueError("the text tower's state dict lacks token_embedding.weight")
    width = state["token_embedding.weight"].shape[1]
    layers = len({key.split(".")[2] for key in state if key.startswith("transformer.resblocks.")})
    return CLIPTextEncoder(arch=sized_text_arch(width, layers, num_heads), weights=state, normalize=normalize,
                           trainable=False)


def build_open_clip(arch: str, weights: Path | None) -> nn.Module:
    """An open_clip text tower (the image tower dropped): a TextTransformer or a CLIP without `visual`."""
    sized = SIZED_TEXT_TOWER.match(arch)
    if sized or arch in CUSTOM_TEXT_TOWERS:
        if sized:
            width, layers, heads = map(int, sized.groups())
            tower = open_clip.transformer.TextTransformer(width=width, layers=layers, heads=heads, output_dim=width,
                                                          act_layer=open_clip.transformer.QuickGELU)
        else:
            tower = open_clip.transformer.TextTransformer(output_dim=None, **CUSTOM_TEXT_TOWERS[arch])
        if weights is not None:
            tower.load_state_dict(open_clip.factory.load_state_dict(str(weights), weights_only=True))
        return tower
    device = torch.get_default_device()  # "meta" under `with torch.device("meta")`: counting parameters
    if weights is not None and is_torchscript(weights):
        # open_clip builds OpenAI's architecture (QuickGELU) from the archive's state dict
        model = open_clip.load_openai_model(str(weights), precision="fp32", device=device)
    else:
        model = open_clip.create_model(arch, pretrained=None if weights is None else str(weights), device=device)
    if hasattr(model, "text"):  # CustomTextCLIP keeps the text tower apart
        model = model.text
    else:
        del model.visual, model.logit_scale  # image side; keeps the count at the text tower's own
    if not hasattr(model, "ln_final"):
        raise ValueError(f"open_clip arch {arch!r} has no CLIP-style text transformer")
    return model


def load_hf(directory: Path):
    """A transformers CLIPTextModel and CLIPTokenizer from a local directory (never the hub)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    if not directory.is_dir():
        raise NotADirectoryError(f"backend 'hf' needs a CLIPTextModel directory, got file {directory}")
    model = CLIPTextModel.from_pretrained(directory, local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(directory, local_files_only=True)
    return model, tokenizer
