"""Datasets. Never imports vqdiff.diffusion, vqdiff.models or vqdiff.train."""
