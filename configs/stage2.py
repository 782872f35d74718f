"""Stage 2, unified pre-training (paper §3.3, Table 1): everything trains except the SigLIP understanding encoder.
The first 10,000 steps use the 30:50:20 mixture, then 14:80:6.

  python -m launch.train --config=stage2 --workdir=runs/stage2 --config.init.path=runs/stage1/checkpoints
Variant for tests and laptops: --config=stage2:tiny
"""

from configs._base import base_config


def get_config(arg=None):
    return base_config(
        arg, stage=2,
        lr=1e-4, warmup_steps=2_000, steps=390_000, batch_size=512,
        mixture=((10_000, (30, 50, 20)), (390_000, (14, 80, 6))),  # understanding : generation : text-only
        freeze=((r"und_encoder/", "frozen"), (r".*", "trainable")),
        init_kind="checkpoint",  # the stage-1 checkpoint (its EMA weights)
    )
