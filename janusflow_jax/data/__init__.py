"""Data: the processor (tokenizer, templates, image preprocessing), the preparation job and its record codec, the
latent spaces, the batch layout and its geometry, the grain loader and the synthetic source."""
