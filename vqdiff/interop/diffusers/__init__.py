"""vqdiff text-to-image parts <-> a diffusers `VQDiffusionPipeline` folder (model_index.json + one folder per part).

    transformer/   Transformer2DModel (discrete input, norm_type "ada_norm")   <-> DiffusionTransformer
    vqvae/         VQModel (decoder + codebook; nearest-neighbour encoder)    <-> GumbelVQVAE or PatchVQGAN
    text_encoder/  transformers CLIPTextModel, tokenizer/ CLIPTokenizer       <-> CLIPTextEncoder (open_clip names)
    scheduler/     VQDiffusionScheduler (num_vec_classes = K + 1)             <-> discrete.num_timesteps / schedule
    learned_classifier_free_sampling_embeddings/                              <-> empty_text_embed

What diffusers cannot hold exactly is refused with the reason: an MLP ratio other than 4, a key-padding mask over
the text (diffusers attends to all positions; `ignore_padding_mask=True` converts anyway), unnormalised text features.
A sinusoidal AdaLN time embedding becomes its (equal) per-step table. VQModel has no Gumbel code logits, so the
export also writes `vqvae/vqdiff_gumbel.safetensors` (our quant_conv, quantize.proj, full codebook, code map and
config) that brings the exact encoder back on import; diffusers ignores that file and encodes by nearest neighbour.
A PatchVQGAN (ITHQ's codec) is a VQModel under other names and needs no such file; a VQModel without the file is
imported as a PatchVQGAN.
Key maps and loading only; diffusers and transformers are imported inside the functions (optional dependency).
"""

from .codec import codec_from_diffusers, codec_to_diffusers
from .common import DiffusersConversionError, require_diffusers
from .folder import export_pipeline, import_pipeline
from .text import text_from_diffusers, text_to_diffusers
from .transformer import transformer_from_diffusers, transformer_to_diffusers

__all__ = ["DiffusersConversionError", "codec_from_diffusers", "codec_to_diffusers", "export_pipeline",
           "import_pipeline", "require_diffusers", "text_from_diffusers", "text_to_diffusers",
           "transformer_from_diffusers", "transformer_to_diffusers"]
