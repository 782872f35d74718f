"""OmniMamba stage 1, understanding alignment (the release's config_stage1_mmu.yaml: stage "align", mmu_task only):
only the projector and the MMU LoRA train; the Mamba-2 LM, its T2I parts, the towers and the VQ stay frozen.
lr 1e-3, warm-up 100, cosine to 1%, 5k steps, 32 rows per GPU x 8 GPUs, understanding rows only.

Trainable at 1.3B: 45,027,840 of 2,237,033,899 parameters (projector 40,972,800 + MMU LoRA 4,055,040 = 48 layers x
(2048 x 8 + 8 x 8512)). The release unfreezes every module named "lora", the T2I adapter included, but no MMU loss
reaches it (zero gradient, and AdamW without weight decay leaves it unchanged), so it is frozen here: stage 2's merge
then takes it from the T2I run.

  python -m launch.train --config=omnimamba_stage1_mmu --workdir=runs/omnimamba_mmu \
      --config.init.llm_path=checkpoints/mamba2-1.3b --config.init.path=checkpoints/OmniMamba
The start (init.kind "start", train/omnimamba_start.py), as the release builds it: mamba2-1.3b in mamba_ssm's layout
(`hf download state-spaces/mamba2-1.3b --local-dir checkpoints/mamba2-1.3b`), the two timm towers and LlamaGen's VQ
(dinov2.safetensors, siglip.safetensors, vq_ds16_t2i.pt in checkpoints/OmniMamba: README, OmniMamba), the new parts
initialised as the release does; both stage-1 runs start from the same one (same seed).
Variant for tests and laptops: --config=omnimamba_stage1_mmu:tiny
"""

from configs import _omnimamba_base as base


def get_config(arg=None):
    return base.base_config(
        arg, stage="1_mmu",
        lr=1e-3, warmup_steps=100, steps=5_000, batch_size=32 * base.GPUS,
        mixture=((5_000, (1, 0)),),  # understanding : text-to-image
        freeze=((base.MMU_LORA, "trainable"), (base.PROJECTOR, "trainable"), (base.TOWERS, "frozen"),
                (r"lm/", "frozen")),
        init_kind="start",
    )
