"""OmniMamba stage 2, unified fine-tuning (the release's config_stage2.yaml: stage "finetune", both tasks): the whole
Mamba-2 LM (blocks, both LoRAs, embeddings, position tables, caption embedder, image MLP) and the projector train;
the towers and the VQ stay frozen. lr 1e-4, no warm-up, cosine to 1%, 150k steps, 3 understanding + 48
text-to-image rows per GPU x 8 GPUs (408 rows, 24 + 384), both tasks in every step.

Trainable at 1.3B: 1,476,290,048 of 2,237,033,899 parameters (the LM 1,435,317,248 + the projector 40,972,800).

Starts from the two stage-1 runs, each contributing the parameters it trained (`train/merge.py`; the release does
not show this step):
  python -m launch.train --config=omnimamba_stage2 --workdir=runs/omnimamba_stage2 \
      --config.init.mmu_path=runs/omnimamba_mmu/checkpoints --config.init.t2i_path=runs/omnimamba_t2i/checkpoints
Variant for tests and laptops: --config=omnimamba_stage2:tiny (random start)
"""

from configs import _omnimamba_base as base


def get_config(arg=None):
    return base.base_config(
        arg, stage="2",
        lr=1e-4, warmup_steps=0, steps=150_000, batch_size=(3 + 48) * base.GPUS,
        mixture=((150_000, (3, 48)),),  # understanding : text-to-image
        freeze=((base.TOWERS, "frozen"), (r"lm/", "trainable"), (base.PROJECTOR, "trainable")),
        init_kind="merge",
    )
