"""Stage 3, supervised fine-tuning (paper §3.3, Table 1): everything trains, SigLIP included.

  python -m launch.train --config=stage3 --workdir=runs/stage3 --config.init.path=runs/stage2/checkpoints
Variant for tests and laptops: --config=stage3:tiny
"""

from configs._base import base_config


def get_config(arg=None):
    return base_config(
        arg, stage=3,
        lr=2e-5, warmup_steps=1_000, steps=26_000, batch_size=256,
        mixture=((26_000, (21, 70, 9)),),  # understanding : generation : text-only
        freeze=((r".*", "trainable"),),
        init_kind="checkpoint",  # the stage-2 checkpoint (its EMA weights)
    )
