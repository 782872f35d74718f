"""Inference: loading a checkpoint (weights, processor, VAE), the compiled CFG sampler and writing images, and
image chat with compiled cached decoding."""
