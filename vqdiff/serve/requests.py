"""What a client may ask of `vqdiff serve`: the JSON of a generate request, checked field by field against the
loaded model, and the model's description that `GET /api/info` answers."""

import math
from dataclasses import dataclass, field

from ..options import Sampler, SamplingStrategy

MAX_PROMPT_CHARS = 1000  # before tokenising: a bound on the work one request can ask of the text tokenizer
MAX_GUIDANCE = 50.0
MAX_SEED = 2**63 - 1


class BadRequest(ValueError):
    """A request the server refuses with 400: the message names the field and what it accepts."""


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    n: int
    seed: int
    options: dict = field(default_factory=dict)  # the pipeline's sampling options the client set


def _integer(body: dict, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name}: {value!r} is not an integer; allowed: {low} to {high}")
    if not low <= value <= high:
        raise BadRequest(f"{name}: {value} is out of range; allowed: {low} to {high}")
    return value


def _number(body: dict, name: str, low: float, high: float, open_low: bool = False) -> float:
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{name}: {value!r} is not a finite number")
    if value < low or value > high or (open_low and value == low):
        raise BadRequest(f"{name}: {value} is out of range; allowed: {'(' if open_low else '['}{low:g}, {high:g}]")
    return float(value)


def _choice(body: dict, name: str, allowed: list[str]) -> str:
    value = body[name]
    if value not in allowed:
        raise BadRequest(f"{name}: {value!r} is not one of {allowed}")
    return value


class RequestRules:
    """The limits of one loaded model: `parse` turns a request body into a GenerateRequest or a BadRequest."""

    def __init__(self, pipe, max_batch: int):
        self.pipe, self.max_batch = pipe, max_batch
        self.max_steps = pipe.diffusion.num_timesteps
        self.prompt_tokens = pipe.model.text_encoder.context_length
        # each sampling option of any model type -> how to read it
        readers = {
            "steps": lambda body: _integer(body, "steps", 1, 1, self.max_steps),
            "guidance_scale": lambda body: _number(body, "guidance_scale", 0.0, MAX_GUIDANCE),
            "truncation_rate": lambda body: _number(body, "truncation_rate", 0.0, 1.0, open_low=True),
            "temperature": lambda body: _number(body, "temperature", 0.0, 10.0, open_low=True),
            "strategy": lambda body: _choice(body, "strategy", [s.value for s in SamplingStrategy]),
            "sampler": lambda body: _choice(body, "sampler", [s.value for s in Sampler]),
            "eta": lambda body: _number(body, "eta", 0.0, 1.0),
        }
        self.readers = {name: readers[name] for name in pipe.OPTIONS}  # this model's
        self.foreign = set(readers) - set(self.readers)  # another model type's

    def parse(self, body) -> GenerateRequest:
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object with at least a prompt")
        known = {"prompt", "n", "seed", *self.readers}
        for name in body:
            if name in known:
                continue
            if name in self.foreign:
                raise BadRequest(f"{name}: not an option of this {self.kind} model; its options: "
                                 f"{sorted(self.readers)}")
            raise BadRequest(f"{name}: unknown field; allowed: {sorted(known)}")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRequest("prompt: missing or empty; give the text to draw")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise BadRequest(f"prompt: {len(prompt)} characters; allowed: at most {MAX_PROMPT_CHARS}")
        tokens = len(self.pipe.model.text_encoder.token_list(prompt))
        if tokens > self.prompt_tokens:
            raise BadRequest(f"prompt: {tokens} tokens with start and end; this model reads at most "
                             f"{self.prompt_tokens}")
        options = {name: read(body) for name, read in self.readers.items() if body.get(name) is not None}
        return GenerateRequest(prompt=prompt.strip(), n=_integer(body, "n", 1, 1, self.max_batch),
                               seed=_integer(body, "seed", 0, 0, MAX_SEED), options=options)

    @property
    def kind(self) -> str:
        return "VQ-Diffusion" if "truncation_rate" in self.readers else "Gaussian"

    def info(self) -> dict:
        """The model's description: type, size, token grid, defaults and limits."""
        pipe = self.pipe
        tokenizer = pipe.tokenizer
        defaults = {k: getattr(v, "value", v) for k, v in pipe.sampling_options().items()}
        return {
            "type": self.kind,
            "name": pipe.cfg.name,
            "parameters": sum(p.numel() for p in pipe.model.parameters()),
            "image_size": pipe.cfg.data.size,
            "token_grid": list(pipe.grid) if hasattr(pipe, "grid") else None,
            "codes": tokenizer.num_embeddings if tokenizer is not None and hasattr(pipe, "grid") else None,
            "defaults": {**defaults, "steps": defaults.get("steps") or self.max_steps, "n": 4, "seed": 0},
            "limits": {"max_batch": self.max_batch, "max_steps": self.max_steps,
                       "prompt_tokens": self.prompt_tokens, "max_guidance": MAX_GUIDANCE},
            "choices": {name: [s.value for s in enum] for name, enum in
                        (("strategy", SamplingStrategy), ("sampler", Sampler)) if name in self.readers},
        }
