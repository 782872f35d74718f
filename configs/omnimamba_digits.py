"""The laptop run for OmniMamba: a small OmniMamba system trained through the release's decoupled recipe (stage 1
MMU and stage 1 T2I from the same start, stage 2 from their merge) on scikit-learn's handwritten digits.

  python -m launch.train --config=omnimamba_digits --workdir=runs/omnimamba_digits        # minutes on 2 CPU cores
  python -m launch.train --config=omnimamba_digits:test --workdir=/tmp/omd                 # seconds (the test's run)

Data as in the JanusFlow digits run (configs/digits.py, examples/digits/pipeline.py): the 1,797 real 8 x 8 digits
upscaled to 16 px PNGs, 20% held out; understanding rows "In: What digit is this?\\nOut: " -> "seven" (OmniMamba's
stage-2 layout), text-to-image rows "a handwritten seven" / "the digit seven" -> image. `launch.prepare_data`'s job
writes the OmniMamba records, fitting a `patch_kmeans` codebook (k-means over the training images' 4 x 4 px patches,
`image_vocab` codes) that stands in for LlamaGen's VQ-16, as the space-to-depth latent stands in for the SDXL-VAE in
the JanusFlow run: a 16 px image is 4 x 4 = 16 image tokens. Generated codes are decoded with that codebook.

The stages (`recipe`, examples/digits/omnimamba.py): the release's trainable sets (configs/omnimamba_stage*.py):
  stage1_mmu  projector + MMU LoRA, understanding rows only, from a random start (seed 0)
  stage1_t2i  image table + its MLP, text embedding, position table, caption embedder, T2I LoRA; text-to-image only;
              the same random start
  stage2      the whole Mamba-2 LM + projector, both tasks in every step, from the merge of the two stage-1 runs
              (`train/merge.py`: each contributes what it trained)
The understanding tower (DINOv2 + SigLIP at 16 px, 4 px patches) and the VQ stay frozen in every stage, as in the
release, but here they are random: nothing is downloaded. A random DINOv2 block with LayerScale 1e-5 passes its patch
embedding (a random linear map of the 4 x 4 px patch) nearly unchanged, so the frozen tower still carries the pixels;
the trained projector and LM learn to read them. The system's VQ is never used (codes come from the codebook).

Prompt dropout (loss.cfg_drop 0.1, the release trains none) lets the evaluation also sample with classifier-free
guidance (`digits.eval_sampling`).
"""

import ml_collections

from configs import _omnimamba_base as base

IMAGE_SIZE = 16  # the tower's side and the generated images' side
PATCH = 4  # tower patches and codebook patches: (16 / 4)^2 = 16 image features and 16 image tokens
IMAGE_VOCAB = 256  # patch_kmeans codes
TEXT_VOCAB = 96  # the run's word-level tokenizer: 64 pieces, [PAD] = 64, the nine OmniMamba tokens 65 .. 73
PAD_ID = 64  # the pipeline checks it against the tokenizer it writes


def model_config(image_vocab: int = IMAGE_VOCAB) -> ml_collections.ConfigDict:
    from janusflow_jax.models import dinosiglip, omnimamba, vit, vq
    from janusflow_jax.models.mamba2 import Mamba2Config

    backbone = Mamba2Config(d_model=128, n_layer=4, d_state=16, headdim=32, chunk_size=16, vocab_size=TEXT_VOCAB,
                            lora_tasks=omnimamba.TASKS, lora_rank=8, lora_alpha=32.0, lora_dropout=0.05,
                            scan_layers=True)  # one compiled block: compiling dominates a CPU run this small
    lm = omnimamba.OmniMambaConfig(backbone=backbone, image_vocab_size=image_vocab,
                                   num_image_tokens=(IMAGE_SIZE // PATCH) ** 2, caption_length=8,
                                   mmu_pos_embed_rows=64, num_image_features=(IMAGE_SIZE // PATCH) ** 2)
    small = dict(image_size=IMAGE_SIZE, patch_size=PATCH, width=32, depth=2, num_heads=2, mlp_dim=64)
    tower = dinosiglip.DinoSigLIPConfig(dino=vit.DINOV2_L_REG4_384.replace(**small),
                                        siglip=vit.SIGLIP_SO400M_384.replace(**small))
    system = omnimamba.OmniMambaSystemConfig(
        lm=lm, vision=tower, projector=dinosiglip.ProjectorConfig(tower.width, lm.d_model),
        # Unused (codes come from the codebook) but part of every OmniMamba system: the smallest VQ with the
        # patch's downsampling (3 levels: 4x).
        vq=vq.VQConfig(codebook_size=image_vocab, encoder_ch_mult=(1, 1, 2), decoder_ch_mult=(1, 1, 2),
                       z_channels=8, ch=8, norm_groups=8, num_res_blocks=1))
    return ml_collections.ConfigDict(system.to_dict())


def _stage(steps, lr, warmup_steps, mixture, freeze, init=""):
    return dict(steps=steps, lr=lr, warmup_steps=warmup_steps, ema_decay=0.0, mixture=tuple(mixture),
                freeze=tuple(freeze), init=init)


def get_config(arg=None) -> ml_collections.ConfigDict:
    """`arg`: None (the laptop run) or "test" (a few examples, 2 steps per stage: seconds)."""
    variant = arg or "default"
    if variant not in ("default", "test"):
        raise ValueError(f"unknown omnimamba_digits variant {arg!r}: use no argument or ':test'")
    c = base.base_config("tiny", stage="1_mmu", lr=1e-3, warmup_steps=10, steps=1, batch_size=32,
                         mixture=((1, (1, 0)),), freeze=((r".*", "trainable"),), init_kind="random")
    with c.unlocked():
        c.model = model_config()
        c.init.kind = "random"  # the stage-1 runs; stage 2 merges them
        c.batch_size = 32
        c.optimizer.warmup_steps = 10
        c.loss.cfg_drop = 0.1
        c.data.update(dict(source="prepared", dir="", mmu_len=24, pad_id=PAD_ID, eos_id=0, num_workers=0,
                           prefetch=2))
        c.log_every = 50
        c.checkpoint_every = 500
        c.keep_checkpoints = 1
        # The release's trainable sets (configs/omnimamba_stage{1_mmu,1_t2i,2}.py), its cosine to 1% of lr.
        c.recipe = ml_collections.ConfigDict(dict(
            stage1_mmu=_stage(300, 2e-3, 20, ((300, (1, 0)),),
                              ((base.MMU_LORA, "trainable"), (base.PROJECTOR, "trainable"),
                               (base.TOWERS, "frozen"), (r"lm/", "frozen")), init="config"),
            stage1_t2i=_stage(400, 2e-3, 20, ((400, (0, 1)),),
                              ((base.T2I_LORA, "trainable"), (base.T2I_PARTS, "trainable"),
                               (base.TOWERS, "frozen"), (base.PROJECTOR, "frozen"), (r"lm/", "frozen")),
                              init="config"),
            stage2=_stage(1200, 1e-3, 20, ((1200, (1, 1)),),
                          ((base.TOWERS, "frozen"), (r"lm/", "trainable"), (base.PROJECTOR, "trainable")),
                          init="merge:stage1_mmu,stage1_t2i"),
        ))
        c.digits = ml_collections.ConfigDict(dict(
            test_fraction=0.2,  # held out: never written to a training manifest
            max_examples=0,  # 0 = all 1,797 digits
            split_seed=0,
            records_per_shard=512,
            codebook_fit_images=4096,  # all training images
            eval_columns=10,  # generated images per prompted digit (sample grid columns, judge votes)
            # (label, temperature, top_k, cfg): greedy is the release's setting (top_k 1) and gives one image per
            # prompt (its columns are equal); sampling draws `eval_columns` different ones. Plain sampling at
            # temperature 1 compounds unlikely patches over the 16 tokens; a lower temperature, top-k or guidance
            # (trained by cfg_drop) keeps the samples varied and legible.
            eval_sampling=(("greedy", 0.0, 0, 1.0), ("t=1", 1.0, 0, 1.0), ("t=0.5", 0.5, 0, 1.0),
                           ("top-k 5", 1.0, 5, 1.0), ("t=0.7 cfg=2", 0.7, 0, 2.0)),
            eval_max_test=0,  # 0 = the whole held-out split for understanding accuracy
            eval_stages=("stage1_mmu", "stage1_t2i", "stage2"),
        ))
        if variant == "test":
            c.model = model_config(image_vocab=32)
            c.batch_size = 8
            c.log_every = 1
            c.checkpoint_every = 2
            for name in ("stage1_mmu", "stage1_t2i", "stage2"):
                c.recipe[name].steps = 2
                c.recipe[name].warmup_steps = 1
                c.recipe[name].mixture = ((2, c.recipe[name].mixture[0][1]),)
            c.digits.max_examples = 60
            c.digits.records_per_shard = 32
            c.digits.eval_columns = 2
            c.digits.eval_sampling = (("greedy", 0.0, 0, 1.0), ("t=1 cfg=3", 1.0, 0, 3.0))
            c.digits.eval_max_test = 8
            c.digits.eval_stages = ("stage2",)
    c.lock()
    return c
