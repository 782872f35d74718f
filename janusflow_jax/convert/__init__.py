"""Checkpoint conversion as data: the shared machinery (`tensors.py`: rules, transforms, safetensors I/O, mismatch
reports, atomic writes) and one table per checkpoint family (`janusflow.py`: the official release, HF Llama, timm
SigLIP; `vae.py`: diffusers AutoencoderKL)."""
