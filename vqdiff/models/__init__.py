"""Networks (nn.Modules only). Never imports vqdiff.diffusion, vqdiff.data or vqdiff.train."""
