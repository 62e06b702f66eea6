"""DiffusionTransformer: the VQ-Diffusion network p_theta(x0 | x_t, y) over image tokens (Gu et al. 2022, Sec. 3.3).

Image tokens [B, N] (K content classes + [MASK] = K) are embedded with learned row and column positions,
then pass `num_layers` blocks of

    x += attn1(ln1(x, t))                 # bidirectional self-attention, AdaLN on the step t
    x += attn2(ln1_1(x, t), text)         # cross-attention to the text features
    x += mlp(ln2(x))

and a LayerNorm + Linear head gives K logits per token (none for [MASK]). Module and parameter names
follow the released checkpoints (`content_emb`, `blocks.i.{ln1, attn1, ln1_1, attn2, ln2, mlp}`,
`to_logits`, `empty_text_embed`), so loading one is a prefix strip.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import Activation, AdaLayerNorm, Attention, TimeEmbedding, drop_text, mlp

# Published sizes (Gu et al. 2022, Sec. 4.1; Tang et al. 2022). The released models use 16 heads throughout.
TRANSFORMER_PRESETS = {
    "S": dict(num_layers=18, width=192, num_heads=16),
    "B": dict(num_layers=19, width=1024, num_heads=16),
    "L": dict(num_layers=36, width=1408, num_heads=16),  # Improved VQ-Diffusion (ITHQ)
}
TRANSFORMER_PRESETS["F"] = TRANSFORMER_PRESETS["B"]  # "F" is B pre-trained on CC and fine-tuned: same network
LOGIT_ALIGNMENT = 16  # inference logits' row length is padded to a multiple of this (aligned GEMM stores)


class ContentEmbedding(nn.Module):
    """Token embedding (K + 1 rows, the last one [MASK]) plus row and column position embeddings."""

    def __init__(self, num_classes: int, grid_size: tuple[int, int], width: int):
        super().__init__()
        self.emb = nn.Embedding(num_classes + 1, width)
        self.height_emb = nn.Embedding(grid_size[0], width)
        self.width_emb = nn.Embedding(grid_size[1], width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids [B, N] (row-major over the grid) -> [B, N, D]."""
        position = (self.height_emb.weight[:, None] + self.width_emb.weight[None]).flatten(0, 1)  # [N, D]
        return self.emb(x) + position


class FactoredContentEmbedding(ContentEmbedding):
    """Token (i, j) = id i * S + j of a product codebook (factors [F, S]) embeds as row i of one table plus row j
    of another, [MASK] as its own row: a pair never seen in training is the sum of two trained parts."""

    def __init__(self, factors: tuple[int, int], grid_size: tuple[int, int], width: int):
        super().__init__(factors[0] * factors[1], grid_size, width)
        del self.emb
        self.second = factors[1]
        self.emb_first = nn.Embedding(factors[0], width)
        self.emb_second = nn.Embedding(factors[1], width)
        self.emb_mask = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        position = (self.height_emb.weight[:, None] + self.width_emb.weight[None]).flatten(0, 1)  # [N, D]
        masked = x >= self.emb_first.num_embeddings * self.second
        ids = x.masked_fill(masked, 0)
        parts = self.emb_first(ids // self.second) + self.emb_second(ids % self.second)
        return torch.where(masked[..., None], self.emb_mask, parts) + position


class TransformerBlock(nn.Module):
    def __init__(self, width: int, num_heads: int, text_dim: int, num_steps: int, time_embedding: TimeEmbedding,
                 mlp_activation: Activation, mlp_ratio: float, dropout: float):
        super().__init__()
        self.ln1 = AdaLayerNorm(width, num_steps, time_embedding)
        self.attn1 = Attention(width, num_heads)
        self.ln1_1 = AdaLayerNorm(width, num_steps, time_embedding)
        self.attn2 = Attention(width, num_heads, context_dim=text_dim)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = mlp(width, mlp_ratio, mlp_activation)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor | None, text_kv: torch.Tensor | None,
                text_mask: torch.Tensor | None, paired: bool = False) -> torch.Tensor:
        """x [B, N, D], t [B]; cross-attention keys/values from `text_kv` [B, 2, H, L, D/H] or else from `text`.
        paired: the text holds 2B rows (conditional, then null) for the same x and t; the self-attention, which
        does not read the text, runs once for both halves, and the output is [2B, N, D]."""
        x = x + F.dropout(self.attn1(self.ln1(x, t)), self.dropout, self.training)
        if paired:
            x, t = torch.cat([x, x]), torch.cat([t, t])
        cross = self.attn2(self.ln1_1(x, t), context=text, key_value=text_kv, mask=text_mask)
        x = x + F.dropout(cross, self.dropout, self.training)
        return x + F.dropout(self.mlp(self.ln2(x)), self.dropout, self.training)


class DiffusionTransformer(nn.Module):
    """Predicts logits of x0 [B, K, N] from x_t [B, N], t [B] and text features [B, L, text_dim].

    Switches for the released models: `time_embedding="table"`, `mlp_activation="quick_gelu"`,
    `mask_text_padding=False` (they attend over all 77 text positions, pads included).
    `null_text_embedding` adds a learned [text_length, text_dim] unconditional input (Tang et al. 2022,
    learnable classifier-free guidance); `text_drop_prob` swaps it in for a caption with that probability
    in training. It starts at the scale of the text features: `null_text_std` per element, by default
    1/sqrt(text_dim) (per-token norm ~1, as L2-normalised CLIP features have); 1.0 suits un-normalised
    layer-norm outputs. `qk_init_std` initialises every attention's query and key weights at that std instead
    of 0.02 (1/sqrt(width) starts the attention logits near 1 at small widths). `factors` [F, S] (a product
    codebook's, K = F * S) factor the token embedding and the output head (FactoredContentEmbedding).
    """

    guides = True  # `guided_call` passes x and t once, the 2B text rows and guidance_scale (see forward)

    def __init__(self, num_classes: int, width: int, num_layers: int, num_heads: int,
                 grid_size: tuple[int, int] = (32, 32), text_dim: int = 512, text_length: int = 77,
                 num_steps: int = 100, time_embedding: TimeEmbedding | str = TimeEmbedding.TABLE,
                 mlp_activation: Activation | str = Activation.GELU, mlp_ratio: float = 4.0,
                 mask_text_padding: bool = True, null_text_embedding: bool = False, text_drop_prob: float = 0.0,
                 null_text_std: float | None = None, dropout: float = 0.0, gradient_checkpointing: bool = False,
                 qk_init_std: float | None = None, factors: tuple[int, int] | None = None):
        super().__init__()
        if not 0.0 <= text_drop_prob < 1.0:
            raise ValueError(f"text_drop_prob must be in [0, 1), got {text_drop_prob}")
        if qk_init_std is not None and not qk_init_std > 0:
            raise ValueError(f"qk_init_std must be > 0 (or None for the released 0.02), got {qk_init_std}")
        if text_drop_prob > 0 and not null_text_embedding:
            raise ValueError("text_drop_prob > 0 needs null_text_embedding=True (the dropped caption's stand-in)")
        self.num_classes, self.grid_size = num_classes, tuple(grid_size)
        self.text_dim, self.text_length = text_dim, text_length
        self.mask_text_padding, self.text_drop_prob = mask_text_padding, text_drop_prob
        self.gradient_checkpointing = gradient_checkpointing
        if factors is not None and factors[0] * factors[1] != num_classes:
            raise ValueError(f"factors {list(factors)} must multiply to num_classes={num_classes}")
        self.factors = None if factors is None else tuple(factors)
        self.content_emb = (ContentEmbedding(num_classes, self.grid_size, width) if factors is None
                            else FactoredContentEmbedding(self.factors, self.grid_size, width))
        self.blocks = nn.ModuleList(
            TransformerBlock(width, num_heads, text_dim, num_steps, TimeEmbedding(time_embedding),
                             Activation(mlp_activation), mlp_ratio, dropout) for _ in range(num_layers))
        head = num_classes if factors is None else sum(factors)
        self.to_logits = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, head))
        self.apply(init_weights)
        if qk_init_std is not None:
            for block in self.blocks:
                for attn in (block.attn1, block.attn2):
                    nn.init.normal_(attn.query.weight, std=qk_init_std)
                    nn.init.normal_(attn.key.weight, std=qk_init_std)
        if null_text_embedding:
            std = text_dim ** -0.5 if null_text_std is None else null_text_std
            self.empty_text_embed = nn.Parameter(torch.randn(text_length, text_dim) * std)
        else:
            self.register_parameter("empty_text_embed", None)

    @property
    def num_tokens(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, text_kv: torch.Tensor | None = None,
                guidance_scale: float | None = None) -> torch.Tensor:
        """x [B, N] token ids in [0, K] (K = [MASK]), t [B] -> float32 logits [B, K, N].

        The text comes either as features `text` [B, L, text_dim] or as `text_kv` [B, layers, 2, H, L, D/H]
        from `cache_text`; `text_mask` [B, L] is True at real tokens (through end-of-text). Text of 2B rows
        (conditional, then null, as `concat_cond` stacks them; classifier-free guidance) gives logits [2B, K, N]
        of the same x and t: the first self-attention, before any text is read, runs once for both halves.
        With `guidance_scale` s it gives the guided logits [B, K, N] instead, null + s (cond - null), from one
        head: the head is linear after its LayerNorm, so the halves mix before it (`logits`).
        """
        self.check_inputs(x, t, text, text_mask, text_kv)
        if self.training and self.text_drop_prob > 0 and text is not None:
            text, text_mask = self.drop_text(text, text_mask, self.text_drop_prob)
        attn_mask = text_mask[:, None, None, :] if self.mask_text_padding and text_mask is not None else None
        paired = (text if text is not None else text_kv).shape[0] == 2 * x.shape[0]
        if guidance_scale is not None and not paired:
            raise ValueError(f"guidance_scale needs the text of 2B rows (conditional, then null), got "
                             f"{(text if text is not None else text_kv).shape[0]} for B = {x.shape[0]}")
        h = self.content_emb(x)  # [B, N, D]
        for i, block in enumerate(self.blocks):
            layer_kv = None if text_kv is None else text_kv[:, i]
            share = paired and i == 0
            if self.gradient_checkpointing and self.training:
                h = checkpoint(block, h, t, text, layer_kv, attn_mask, share, use_reentrant=False)
            else:
                h = block(h, t, text, layer_kv, attn_mask, share)
            if share:
                t = torch.cat([t, t])
        return self.logits(h, guidance_scale)

    def logits(self, h: torch.Tensor, guidance_scale: float | None = None) -> torch.Tensor:
        """[B, N, D] -> [B, K, N]; with `guidance_scale` s, h of 2B rows (conditional, then null) -> the guided
        [B, K, N]: W (n + s (c - n)) + b = n' + s (c' - n') for the normalised rows c, n and their logits c', n'.

        In training the logits are written class-major (the loss's softmax runs along K at stride 1 over N);
        otherwise token-major, a [B, K, N] view of [B, N, K'] memory, K' = K rounded up to a multiple of 16, so the
        sampler reads each token's K classes contiguously (`X0Distribution`). Neither layout costs a transpose copy
        of the largest tensor; the padded rows keep the GEMM's stores aligned (K = 2887: 67 -> 45 ms on 2 cores)."""
        norm, out = self.to_logits
        h = norm(h)
        if guidance_scale is not None:
            cond, null = h.chunk(2)
            h = torch.lerp(null, cond, guidance_scale)
        if self.training:
            weight = out.weight.expand(h.shape[0], -1, -1)  # [B, K, D]
            logits, class_dim = torch.baddbmm(out.bias[:, None], weight, h.transpose(1, 2)).float(), 1
        else:
            weight, bias, pad = out.weight, out.bias, -out.out_features % LOGIT_ALIGNMENT
            if pad:
                weight, bias = F.pad(weight, (0, 0, 0, pad)), F.pad(bias, (0, pad))
            logits, class_dim = F.linear(h, weight, bias)[..., :out.out_features].float(), 2
        if self.factors is not None:
            # logit (i, j) = a_i + b_j: softmax over the K = F * S pairs is the product of two categoricals
            first, second = logits.split(self.factors, dim=class_dim)
            logits = (first.unsqueeze(class_dim + 1) + second.unsqueeze(class_dim)).flatten(class_dim, class_dim + 1)
        return logits if class_dim == 1 else logits.transpose(1, 2)

    def cache_text(self, text: torch.Tensor, text_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-layer cross-attention keys and values of `text`, computed once per sampling run.

        Returns a dict usable as the model's keyword inputs (`model(x, t, **cached)`), batch on dim 0,
        so guidance can concatenate it with the cached null condition.
        """
        if text.dim() != 3 or text.shape[-1] != self.text_dim:
            raise ValueError(f"text must be [B, L, {self.text_dim}], got {list(text.shape)}")
        if text_mask is None:
            text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        if not text_mask.any(dim=1).all():
            raise ValueError("text_mask has a row with no real token; each caption keeps at least start/end-of-text")
        text_kv = torch.stack([block.attn2.key_value(text) for block in self.blocks], dim=1)
        return {"text_kv": text_kv, "text_mask": text_mask}

    def null_text(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned unconditional input: features [B, L, text_dim] and an all-True mask [B, L]."""
        if self.empty_text_embed is None:
            raise ValueError("this DiffusionTransformer has no null text embedding (null_text_embedding=False); "
                             "encode the empty prompt instead")
        text = self.empty_text_embed[None].expand(batch_size, -1, -1)
        return text, torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)

    def drop_text(self, text: torch.Tensor, text_mask: torch.Tensor | None, drop_prob: float,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Replace each caption by the null embedding with probability `drop_prob` (classifier-free training)."""
        if text.shape[1] != self.text_length:
            raise ValueError(f"caption dropping needs text of length {self.text_length}, got {text.shape[1]}")
        null, _ = self.null_text(text.shape[0])
        return drop_text(text, text_mask, null, drop_prob, generator)

    def check_inputs(self, x, t, text, text_mask, text_kv):
        if x.dim() != 2 or x.shape[1] != self.num_tokens:
            raise ValueError(f"x must be token ids [B, {self.num_tokens}] for grid {self.grid_size}, "
                             f"got {list(x.shape)}")
        if t.shape != x.shape[:1]:
            raise ValueError(f"t must be [B] = [{x.shape[0]}], got {list(t.shape)}")
        if text is None and text_kv is None:
            raise ValueError("DiffusionTransformer needs text features `text` or cached `text_kv` (cache_text)")
        batch = (text if text is not None else text_kv).shape[0]
        if batch not in (x.shape[0], 2 * x.shape[0]):
            raise ValueError(f"the text's batch must be x's ({x.shape[0]}) or twice it (conditional, then null), "
                             f"got {batch}")
        if text is not None and (text.dim() != 3 or text.shape[2] != self.text_dim):
            raise ValueError(f"text must be [{batch}, L, {self.text_dim}], got {list(text.shape)}")
        if text_kv is not None and text_kv.shape[1] != len(self.blocks):
            raise ValueError(f"text_kv must be [{batch}, {len(self.blocks)}, 2, H, L, D/H] from cache_text, "
                             f"got {list(text_kv.shape)}")
        length = text.shape[1] if text is not None else text_kv.shape[-2]
        if text_mask is not None and text_mask.shape != (batch, length):
            raise ValueError(f"text_mask must be [{batch}, {length}], got {list(text_mask.shape)}")


def init_weights(module: nn.Module):
    """GPT-2 style initialisation, as in the released training code."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Unique parameters per top-level part (e.g. content_emb, blocks, to_logits, empty_text_embed) and total."""
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        part = name.split(".")[0]
        counts[part] = counts.get(part, 0) + param.numel()
    counts["total"] = sum(counts.values())
    return counts
