"""OmniMamba stage 1, text-to-image alignment (the release's config_stage1_t2i.yaml: stage "align", t2i_task only):
the image-token embedding and its MLP (img_head is tied to the table), the text embedding (lm_head tied), the t2i
position table, the caption embedder and the T2I LoRA train; the Mamba-2 blocks, mmu_pos_embed, the projector, the
towers and the VQ stay frozen. lr 8e-4, warm-up 1000, cosine to 1%, 100k steps, 90 rows per GPU x 8 GPUs,
text-to-image rows only.

Trainable at 1.3B: 187,422,720 of 2,237,033,899 parameters (text embedding 102,989,824 + image table 33,554,432 +
its MLP 37,761,024 + caption embedder 8,388,608 + pos_embed 673,792 + T2I LoRA 4,055,040). As in stage 1 MMU, the
other task's adapter gets no gradient in the release and is frozen here.

  python -m launch.train --config=omnimamba_stage1_t2i --workdir=runs/omnimamba_t2i \
      --config.init.llm_path=checkpoints/mamba2-1.3b --config.init.path=checkpoints/OmniMamba
The start (init.kind "start", train/omnimamba_start.py), as the release builds it: mamba2-1.3b in mamba_ssm's layout
(`hf download state-spaces/mamba2-1.3b --local-dir checkpoints/mamba2-1.3b`), the two timm towers and LlamaGen's VQ
(dinov2.safetensors, siglip.safetensors, vq_ds16_t2i.pt in checkpoints/OmniMamba: README, OmniMamba), the new parts
initialised as the release does; both stage-1 runs start from the same one (same seed).
Variant for tests and laptops: --config=omnimamba_stage1_t2i:tiny
"""

from configs import _omnimamba_base as base


def get_config(arg=None):
    return base.base_config(
        arg, stage="1_t2i",
        lr=8e-4, warmup_steps=1_000, steps=100_000, batch_size=90 * base.GPUS,
        mixture=((100_000, (0, 1)),),  # understanding : text-to-image
        freeze=((base.T2I_LORA, "trainable"), (base.T2I_PARTS, "trainable"), (base.TOWERS, "frozen"),
                (base.PROJECTOR, "frozen"), (r"lm/", "frozen")),
        init_kind="start",
    )
