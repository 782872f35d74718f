"""The models in Flax Linen: configs, shared layers, the towers (Llama LLM, SigLIP, ShallowUViT), the JanusFlow
composite, the SDXL-VAE and the Mamba-2 LM (OmniMamba's backbone). Pure modules: no I/O, no training state."""
