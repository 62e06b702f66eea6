"""`vqdiff serve`: a local web page and HTTP API for a text-to-image model (optional extra `vqdiff[serve]`)."""
