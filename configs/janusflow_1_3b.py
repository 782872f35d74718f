"""JanusFlow-1.3B as released (deepseek-ai/JanusFlow-1.3B): DeepSeek-LLM 1.3B + SigLIP-L/16-384 + ShallowUViT.

Usage: `--config=configs/janusflow_1_3b.py`; `get_config().model` feeds `JanusFlowConfig.from_dict`.
"""

import ml_collections


def model_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        llm=dict(vocab_size=102400, hidden_size=2048, intermediate_size=5632, num_layers=24, num_heads=16,
                 num_kv_heads=16, head_dim=128, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=16384,
                 tie_word_embeddings=False),
        und_encoder=dict(image_size=384, patch_size=16, width=1024, depth=24, num_heads=16, mlp_dim=4096,
                         layer_norm_eps=1e-6, attn_pool=True, model_name="siglip_large_patch16_384"),
        gen_encoder=dict(in_channels=4, channels=768, kernel_size=2, stride=2, padding=0, num_blocks=2,
                         norm_eps=1e-6, use_bias=True, ffn_factor=4),
        gen_decoder=dict(in_channels=768, channels=768, out_channels=4, num_blocks=2, upsamples=1, norm_eps=1e-6,
                         use_bias=True, ffn_factor=4),
        repa=dict(hidden_dim=2048, layer=6),  # REPA reads the residual stream after block 6 (paper §3.2)
        latent_size=48,  # 384 px / SDXL-VAE factor 8
        dtype="bfloat16",
        param_dtype="float32",
        scan_layers=True,
        remat_policy="dots_no_batch",
        attention="auto",  # cuDNN flash attention on NVIDIA GPUs in bf16, Splash on TPUs, XLA elsewhere (config.py)
    ))


def run_config(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The locked top-level config around a model config (shared by the model configs in this folder)."""
    config = ml_collections.ConfigDict()
    config.model = model
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    config.lock()
    return config


def get_config(arg=None) -> ml_collections.ConfigDict:
    del arg
    return run_config(model_config())
