"""Which caption words a text-to-image model ties to the image, measured without sampling.

For a real one-object Shapes image x0 and each attribute (position, colour, shape, size), the caption is rewritten
with every value of that attribute, and the model scores each rewrite; the attribute is identified when the true
caption scores strictly highest. VQ-Diffusion scores log p(x0 | x_t, caption) summed over the masked tokens; at
t = T-1 (every token masked, the default) this asks whether the caption alone tells the model what to draw: a
model that identifies an attribute here but draws it wrong loses it while sampling, not while learning.
A Gaussian DDPM scores minus its training loss at step t (one noise draw shared by every rewrite, so only the
caption differs): at a fixed t that loss is the ELBO term L_t up to a constant factor, so the ranking is the
likelihood's. Over several t it shows from which noise level on the caption is read.
"""

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..data.shapes import COLOURS, POSITIONS, SHAPES, SIZES, Object, ShapesDataset, caption
from ..pipeline import GaussianTextToImagePipeline, TextToImagePipeline

ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "position": POSITIONS, "colour": tuple(COLOURS), "shape": SHAPES, "size": tuple(SIZES)}


@dataclass
class AttributeProbe:
    """Per attribute: the share of images whose true caption scored strictly highest, chance (1 / values), and
    the mean gain of the true caption over the mean of its rewrites, in `unit` (nats: VQ-Diffusion's
    log-likelihood; "loss": a Gaussian model's training loss, lower with the true caption)."""
    images: int
    identified: dict[str, float]
    chance: dict[str, float]
    gain: dict[str, float]
    unit: str = "nats"

    def table(self) -> str:
        lines = [f"{'attribute':10s} {'identified %':>12s} {'chance %':>9s} {'gain (' + self.unit + ')':>12s}"]
        for name in ATTRIBUTE_VALUES:
            gain = f"{self.gain[name]:12.2f}" if self.unit == "nats" else f"{self.gain[name]:12.4f}"
            lines.append(f"{name:10s} {100 * self.identified[name]:12.1f} {100 * self.chance[name]:9.1f} {gain}")
        return "\n".join(lines)


def rewrites(obj: Object) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """Every one-attribute rewrite of a one-object caption, and per attribute its (start, true index) in that list."""
    captions, spans = [], {}
    for name, values in ATTRIBUTE_VALUES.items():
        spans[name] = (len(captions), values.index(getattr(obj, name)))
        captions += [caption([dataclasses.replace(obj, **{name: value})]) for value in values]
    return captions, spans


def score_rewrites(log_likelihood: Callable[[torch.Tensor, list[str]], torch.Tensor], x0: torch.Tensor,
                   objects: Sequence[Object], progress: bool = True, unit: str = "nats") -> AttributeProbe:
    """`log_likelihood(x0, captions) -> [len(captions)]` scores one image (x0[i]) under each caption."""
    hits = {name: 0 for name in ATTRIBUTE_VALUES}
    gains = {name: 0.0 for name in ATTRIBUTE_VALUES}
    for tokens, obj in tqdm(list(zip(x0, objects)), desc="probe", disable=not progress):
        captions, spans = rewrites(obj)
        scores = log_likelihood(tokens, captions).double()
        for name, (start, true) in spans.items():
            part = scores[start:start + len(ATTRIBUTE_VALUES[name])]
            others = torch.cat([part[:true], part[true + 1:]])
            hits[name] += int(bool(part[true] > others.max()))
            gains[name] += float(part[true] - part.mean())
    n = len(objects)
    return AttributeProbe(n, {k: v / n for k, v in hits.items()},
                          {k: 1 / len(v) for k, v in ATTRIBUTE_VALUES.items()}, {k: v / n for k, v in gains.items()},
                          unit)


def _one_object_images(pipe, n: int, split: str, seed: int):
    if pipe.cfg.data.name != "shapes":
        raise ValueError(f"the attribute probe scores Shapes captions; this model was trained on "
                         f"data.name: {pipe.cfg.data.name!r}")
    dataset = ShapesDataset(split, size=pipe.cfg.data.size, num_samples=n, seed=seed, max_objects=1)
    items = [dataset[i] for i in range(n)]
    images = torch.stack([item["image"] for item in items]).to(pipe.device)
    return images, [item["objects"][0] for item in items]


@torch.no_grad()
def probe_attributes(pipe, n: int = 100, split: str = "val", t: int | None = None, seed: int = 0,
                     progress: bool = True) -> AttributeProbe:
    """Probe a text-to-image pipeline on the first `n` one-object images of `split`. VQ-Diffusion encodes them with
    its tokenizer; `t` = None masks every token (t = T-1), an int noises x0 to that step with q(x_t | x0) instead.
    A Gaussian model (GaussianTextToImagePipeline) needs `t`; a latent one diffuses its tokenizer's latents."""
    if not isinstance(pipe, (TextToImagePipeline, GaussianTextToImagePipeline)):
        raise ValueError(f"the attribute probe needs a text-to-image model, got a {type(pipe).__name__}")
    steps = pipe.diffusion.num_timesteps
    if t is not None and not 0 <= t < steps:
        raise ValueError(f"t must be in [0, {steps - 1}], got {t}")
    if isinstance(pipe, GaussianTextToImagePipeline):
        return _probe_gaussian(pipe, n, split, t, seed, progress)
    diffusion, network = pipe.diffusion, pipe.model.network
    images, objects = _one_object_images(pipe, n, split, seed)
    x0 = torch.cat([pipe.tokenizer.encode(chunk) for chunk in images.split(64)]).flatten(1)  # [n, N]
    dtype = next(network.parameters()).dtype
    generator = torch.Generator(pipe.device).manual_seed(seed)

    def log_likelihood(tokens: torch.Tensor, captions: list[str]) -> torch.Tensor:
        b = len(captions)
        step = torch.full((b,), steps - 1 if t is None else t, device=pipe.device)
        if t is None:
            xt = torch.full((b, tokens.numel()), diffusion.mask_id, device=pipe.device)
        else:  # one noised x_t shared by every rewrite, so only the caption differs
            xt = diffusion.q_sample(tokens[None], step[:1], generator).expand(b, -1)
        text, mask = pipe.model.encode_text(captions)
        logits = diffusion.model_logits(network, xt, step, text=text.to(dtype), text_mask=mask)
        log_p = logits.log_softmax(1).gather(1, tokens[None, None].expand(b, 1, -1)).squeeze(1)  # [b, N]
        return (log_p * (xt == diffusion.mask_id)).sum(1)

    return score_rewrites(log_likelihood, x0, objects, progress)


def _probe_gaussian(pipe, n: int, split: str, t: int | None, seed: int, progress: bool) -> AttributeProbe:
    if t is None:
        raise ValueError("a Gaussian model is probed at a noise step: give t (e.g. 100, 500, 900)")
    images, objects = _one_object_images(pipe, n, split, seed)
    if pipe.latent:
        latents = torch.cat([pipe.tokenizer.encode_latents(chunk) for chunk in images.split(64)])
        images = latents * pipe.cfg.gaussian.latent_scale
    generator = torch.Generator(pipe.device).manual_seed(seed)

    def log_likelihood(x0: torch.Tensor, captions: list[str]) -> torch.Tensor:
        b = len(captions)
        noise = torch.randn(x0.shape, generator=generator, device=pipe.device)
        step = torch.full((b,), t, dtype=torch.long, device=pipe.device)
        cond = pipe.model.encode_text(captions)
        loss = pipe.diffusion.training_losses(pipe.network, x0.expand(b, *x0.shape), step,
                                              noise=noise.expand(b, *x0.shape), text=cond[0], text_mask=cond[1])
        return -loss["loss"]

    return score_rewrites(log_likelihood, images, objects, progress, unit="loss")
