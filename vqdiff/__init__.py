"""vqdiff: text-to-image VQ-Diffusion and Gaussian DDPM on one diffusion backend."""

__version__ = "0.1.0"
