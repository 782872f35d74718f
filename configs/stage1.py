"""Stage 1, adaptation (paper §3.3, Table 1): only the new parts train — the aligners, `beg_of_und_embed`, the
generation encoder/decoder and the REPA projector; the LLM and SigLIP stay frozen.

  python -m launch.train --config=stage1 --workdir=runs/stage1 \
      --config.init.llm_path=checkpoints/deepseek-llm-1.3b-base --config.init.siglip_path=checkpoints/ViT-L-16-SigLIP-384
Variant for tests and laptops: --config=stage1:tiny
"""

from configs._base import base_config

NEW_PARTS = r"(und_aligner|beg_of_und_embed|gen_encoder|gen_enc_aligner|gen_decoder|gen_dec_aligner_norm|gen_dec_aligner|repa_projector)/?"


def get_config(arg=None):
    return base_config(
        arg, stage=1,
        lr=1e-4, warmup_steps=2_000, steps=10_000, batch_size=512,
        mixture=((10_000, (50, 50, 0)),),  # understanding : generation : text-only
        freeze=((NEW_PARTS, "trainable"), (r"(language_model|und_encoder)/", "frozen")),
        init_kind="parts",  # DeepSeek-LLM-1.3B-base (HF layout) + SigLIP-L/16-384 (timm); the rest random
    )
