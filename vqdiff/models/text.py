"""CLIP text encoders: prompts -> per-token features [B, 77, D] and a key-padding mask [B, 77].

VQ-Diffusion conditions on every one of the 77 token positions of CLIP's last layer (after the final
layer norm, before the text projection), each L2-normalised. This is the only module that imports
open_clip or transformers. Weights come only from local files; nothing is fetched at run time.
"""

import enum
import logging
import zipfile
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# Small text towers with CLIP's BPE vocabulary, built directly for configs without pretrained weights.
CUSTOM_TEXT_TOWERS = {
    "clip-text-small": dict(width=256, layers=4, heads=4),
}
PAD_ID = 0  # open_clip and the released VQ-Diffusion pad with 0 after end-of-text, whatever the backend


class TextBackend(str, enum.Enum):
    OPEN_CLIP = "open_clip"
    HF = "hf"


class CLIPTextEncoder(nn.Module):
    """Tokenise prompts with CLIP's BPE and return (features [B, L, D], mask [B, L]).

    `mask` is True from start- through end-of-text (the real tokens) and False at the padding after it.
    `weights` is a local file (open_clip state dict .pt/.bin/.safetensors, or OpenAI's TorchScript
    ViT-B-32.pt), a local `transformers` CLIPTextModel directory for backend "hf", or "none" for a
    random initialisation. `arch` is an open_clip model name or a key of CUSTOM_TEXT_TOWERS.
    A frozen encoder (`trainable=False`) runs in eval mode under no_grad and can cache features.
    """

    def __init__(self, backend: TextBackend | str = TextBackend.OPEN_CLIP, arch: str = "ViT-B-32",
                 weights: str | Path = "none", context_length: int = 77, normalize: bool = True,
                 trainable: bool = False, cache_size: int = 4096):
        super().__init__()
        self.backend = TextBackend(backend)
        self.context_length, self.normalize, self.trainable = context_length, normalize, trainable
        self.cache_size = cache_size
        self.cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        random_init = str(weights).lower() == "none"
        if not random_init and not Path(weights).exists():
            raise FileNotFoundError(f"text encoder weights not found: {weights} (use weights='none' for random init)")
        if self.backend is TextBackend.HF:
            if random_init:
                raise ValueError("backend 'hf' needs weights = a local CLIPTextModel directory; "
                                 "use backend 'open_clip' for a random-initialised encoder")
            self.tower, self.tokenizer = load_hf(Path(weights))
            self.dim = self.tower.config.hidden_size
        else:
            self.tower = build_open_clip(arch, None if random_init else Path(weights))
            self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
            self.dim = self.tower.transformer.width
            if self.tower.vocab_size != self.tokenizer.vocab_size:
                raise ValueError(f"arch {arch!r} has vocabulary {self.tower.vocab_size}, not CLIP's BPE "
                                 f"({self.tokenizer.vocab_size}); only CLIP-BPE text towers are supported")
        if random_init:
            logger.warning("text encoder %s is randomly initialised (weights: none): its features are untrained%s",
                           arch, "; it is trained jointly" if trainable else "")
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
        return (F.normalize(features, dim=-1) if self.normalize else features), mask

    def token_features(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, L] ids -> [B, L, D] hidden states after the final layer norm (causal attention, as in CLIP)."""
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


def build_open_clip(arch: str, weights: Path | None) -> nn.Module:
    """An open_clip text tower (the image tower dropped): a TextTransformer or a CLIP without `visual`."""
    if arch in CUSTOM_TEXT_TOWERS:
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
