"""The pipeline base: a trained model as an object a user calls, whatever its model type.

A pipeline holds the config, the trained model (`model`: the network, with its text encoder for text-to-image),
the diffusion process and, for models on a tokenizer's codes or latents, the tokenizer. The base loads it from a
pipeline folder or a run / checkpoint (its EMA weights), saves it as a pipeline folder, moves and compiles it,
and (TextPipeline) samples prompts in batches; each model type adds its sampling and decoding.
"""

import copy
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from .. import build
from ..config import ConfigError, ExperimentConfig, ModelType
from ..io.checkpoint import load_into, load_weights, read_config, resolve_checkpoint
from ..io.pipeline_folder import (CONFIG_FILE, TEXT_ENCODER_FILE, TOKENIZER_DIR, check_complete,
                                  find_pipeline_folder, load_parts, write_pipeline_folder)
from ..io.tokenizer import load_tokenizer


class Pipeline:
    NETWORK_FILE = "network.safetensors"  # the network's weights file in a pipeline folder
    OPTIONS: tuple[str, ...] = ()         # sampling options, each defaulting to cfg.sample's value
    CASTS_NETWORK = False                 # whether `to(device, dtype)` may cast the network

    def __init__(self, cfg: ExperimentConfig, model, diffusion, tokenizer=None):
        self.cfg, self.model, self.diffusion = cfg, model.eval(), diffusion
        self.tokenizer = tokenizer.eval() if tokenizer is not None else None

    @classmethod
    def check_config(cls, cfg: ExperimentConfig, where: Path) -> None:
        """A CheckpointError when the saved model is not one this class samples."""

    @property
    def network(self) -> torch.nn.Module:
        return getattr(self.model, "network", self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device, dtype: torch.dtype | None = None) -> "Pipeline":
        """Move every part to `device`; `dtype` (e.g. torch.bfloat16 on a GPU) casts the network only where the
        model type allows it: the text encoder and the tokenizer stay float32."""
        if dtype is not None and not self.CASTS_NETWORK:
            raise ConfigError("a dtype cast is for VQ-Diffusion transformers; Gaussian models sample in float32")
        self.model.to(device)
        if self.tokenizer is not None:
            self.tokenizer.to(device)
        if dtype is not None:
            self.network.to(dtype)
        return self

    def compile(self, mode: str | None = None) -> "Pipeline":
        """torch.compile the network's forward (GPUs: fuses its elementwise ops, ~13% faster for the B preset
        on an H200; the first call of each batch size compiles for a minute). mode "reduce-overhead" adds CUDA
        graphs, for small models and batches whose steps are launch-bound."""
        self.network.forward = torch.compile(self.network.forward, mode=mode)
        return self

    # ---- loading and saving ----------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype: torch.dtype | None = None):
        """A directory written by save_pretrained (or a run's `pipeline/`), else a training run or checkpoint
        (its EMA weights); see `to` for dtype."""
        folder = find_pipeline_folder(path, cls.NETWORK_FILE)
        pipe = cls._from_folder(folder) if folder is not None else cls._from_checkpoint(resolve_checkpoint(path))
        return pipe.to(device, dtype)

    @classmethod
    def _from_checkpoint(cls, checkpoint: Path):
        cfg = read_config(checkpoint)
        cls.check_config(cfg, checkpoint)
        tokenizer = build.load_configured_tokenizer(cfg) if build.uses_tokenizer(cfg) else None
        model, diffusion = build.build_model_and_diffusion(cfg, tokenizer)
        load_into(model, load_weights(checkpoint / "ema.safetensors"), f"{checkpoint}/ema.safetensors")
        return cls(cfg, model, diffusion, tokenizer)

    @classmethod
    def _from_folder(cls, path: Path):
        cfg = read_config(path)
        cls.check_config(cfg, path)
        text = cfg.model is ModelType.VQ_DIFFUSION or cfg.unet.text
        check_complete(path, (CONFIG_FILE, cls.NETWORK_FILE) + ((TEXT_ENCODER_FILE,) if text else ())
                       + ((TOKENIZER_DIR,) if build.uses_tokenizer(cfg) else ()))
        tokenizer = load_tokenizer(path / TOKENIZER_DIR) if build.uses_tokenizer(cfg) else None
        built = copy.deepcopy(cfg)
        if cfg.text.weights == TEXT_ENCODER_FILE:  # the folder's own copy (converted pipelines)
            built.text.weights = str(path / TEXT_ENCODER_FILE)
        model, diffusion = build.build_model_and_diffusion(built, tokenizer)
        load_parts(path, cls._parts(model))
        return cls(cfg, model, diffusion, tokenizer)

    @classmethod
    def _parts(cls, model) -> dict:
        """The weights files of a pipeline folder and the modules they hold."""
        if hasattr(model, "text_encoder"):
            return {cls.NETWORK_FILE: model.network, TEXT_ENCODER_FILE: model.text_encoder}
        return {cls.NETWORK_FILE: model}

    def save_pretrained(self, path) -> Path:
        """config.yaml, the network's and the text encoder's weights and, when the model has one, tokenizer/
        (written atomically)."""
        return write_pipeline_folder(path, self.cfg, self._parts(self.model), self.tokenizer)

    # ---- sampling --------------------------------------------------------------------------------

    def sampling_options(self, **given) -> dict:
        """Each of OPTIONS: the given value (not None), else cfg.sample's."""
        foreign = [k for k, v in given.items() if v is not None and k not in self.OPTIONS]
        if foreign:
            raise ConfigError(f"{', '.join(foreign)}: not options of {type(self).__name__}, which takes "
                              f"{', '.join(self.OPTIONS)}")
        return {k: given[k] if given.get(k) is not None else getattr(self.cfg.sample, k) for k in self.OPTIONS}


class TextPipeline(Pipeline):
    """A text-to-image pipeline: prompts -> PIL images, one per prompt. A model type adds `sample_iter` (the
    states of one sampling run) and `decode` (a state -> images)."""

    def sample_iter(self, prompts, generator=None, progress: bool = True, **options):
        raise NotImplementedError

    def decode(self, state: torch.Tensor) -> list[Image.Image]:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, prompts, generator=None, progress: bool = True, **options) -> list[Image.Image]:
        """One image per prompt; the options are the model type's OPTIONS."""
        state = None
        for state in self.sample_iter(prompts, generator, progress, **options):
            pass
        return self.decode(state)

    def generate(self, prompts: list[str], batch_size: int = 50, generator=None, desc: str | None = "sampling",
                 **options) -> list[Image.Image]:
        """One image per prompt, `batch_size` prompts per call, one generator throughout; `desc` labels a
        progress bar over the batches (None: no bar)."""
        images = []
        for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None):
            images += self(prompts[i:i + batch_size], generator, progress=False, **options)
        return images
