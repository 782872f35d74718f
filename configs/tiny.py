"""A tiny JanusFlow (a few layers, small widths) for tests and download-free runs; same structure as 1.3B.

The widths between towers differ from 1.3B on purpose (the official code hard-codes 1024/2048/768; we do not).
"""

import ml_collections

from configs.janusflow_1_3b import run_config


def model_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        llm=dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048,
                 tie_word_embeddings=False),
        und_encoder=dict(image_size=64, patch_size=16, width=32, depth=2, num_heads=2, mlp_dim=128,
                         layer_norm_eps=1e-6, attn_pool=True, model_name="siglip_tiny"),
        gen_encoder=dict(in_channels=4, channels=24, kernel_size=2, stride=2, padding=0, num_blocks=2,
                         norm_eps=1e-6, use_bias=True, ffn_factor=4),
        gen_decoder=dict(in_channels=24, channels=24, out_channels=4, num_blocks=2, upsamples=1, norm_eps=1e-6,
                         use_bias=True, ffn_factor=4),
        repa=dict(hidden_dim=64, layer=1),
        latent_size=8,  # 64 px / 8
        dtype="float32",
        param_dtype="float32",
        scan_layers=False,
        remat_policy="none",
        attention="auto",
    ))


def get_config(arg=None) -> ml_collections.ConfigDict:
    del arg
    return run_config(model_config())
