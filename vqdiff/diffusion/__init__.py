"""Diffusion math on tensors. Never imports vqdiff.models, vqdiff.data or vqdiff.train."""
