"""The run config of an OmniMamba training stage: the defaults `configs/omnimamba_stage{1_mmu,1_t2i,2}.py` fill in
with the release's YAMLs (hustvl/OmniMamba config/config_stage{1_mmu,1_t2i,2}.yaml, train_stage2.py; docs/reference.md
§9.1). The top-level fields are `configs/_base.py`'s, so the one trainer reads both families, plus `family`.

Fields that differ from JanusFlow's:
  family                "omnimamba"
  model                 the OmniMambaSystemConfig fields (lm, vision, projector, vq): the release at 1.3B or a tiny system
  init                  kind: "random" | "checkpoint" (an orbax root holding the whole system: a `launch.convert`ed
                        release or a previous run) | "start" (stage 1's start as the release builds it,
                        `train/omnimamba_start.py`: the Mamba-2 LM directory `llm_path` (state-spaces/mamba2-1.3b,
                        mamba_ssm's layout) and `path`, a directory holding the two timm towers and the VQ; the new
                        parts initialised as the release does) | "merge" (stage 2: the two stage-1 roots `mmu_path`
                        and `t2i_path`, each contributing what it trained, `train/merge.py`)
  optimizer             + decay ("cosine": warm-up, then cosine to final_fraction x lr at `steps`) and final_fraction
  loss                  mmu_weight, t2i_weight (1, 1: CE(t2i) + CE(mmu)), cfg_drop (0: the release trains no
                        unconditional branch), pad_id (the [PAD] id a dropped caption is filled with; = data.pad_id)
  mixture               ((until_step, (mmu, t2i)), ...): the rows of each task per step, as a ratio
  data                  source "synthetic" | "prepared" (+ the loader's fields), mmu_len (ids per understanding row:
                        the 4 task ids + 449 text tokens in the release), pad_id, eos_id (the tokenizer's [PAD] and
                        <|endoftext|>: 50277 and 0 for gpt-neox-20b with the OmniMamba tokens)
  xla_tpu_flags         windowed einsums off (JanusFlow sets none)

The release trains with AdamW (0.9, 0.95), weight decay 0, transformers' Trainer defaults otherwise (eps 1e-8, global
norm clip 1.0), bf16, no EMA (ema_decay 0 here: the checkpoints hold the raw weights).
"""

from __future__ import annotations

import ml_collections

from janusflow_jax.data import loader as data_lib

FAMILY = "omnimamba"
GPUS = 8  # the release's YAMLs: 8 processes on one machine; batch sizes below are per GPU x 8
RELEASE_PAD_ID = 50277  # gpt-neox-20b's 50277 ids, then [PAD]; <|soi|> .. <|lvg|> follow (omnimamba_processor.py)
TINY_PAD_ID = 80  # the tiny model's 96 text ids: [PAD] 80, the nine OmniMamba tokens 81 .. 89

# Parameter-path regexes (our layout: params {"lm", "vision", "projector", "vq"}; layers per-layer or scanned).
LAYER = r"lm/backbone/layers(_\d+)?/"
MMU_LORA = LAYER + r"mixer/lora_mmu/"
T2I_LORA = LAYER + r"mixer/lora_t2i/"
PROJECTOR = r"projector/"
# Stage 1 T2I's new parts: img_embeddings (+ its project_in MLP; img_head is tied to the table), the text embedding
# (lm_head is tied to it), pos_embed, caption_embed.
T2I_PARTS = r"lm/(img_embeddings|img_project_in|backbone/embeddings|pos_embed|caption_embed)(/|$)"
TOWERS = r"(vision|vq)/"


def release_model() -> ml_collections.ConfigDict:
    """OmniMamba-1.3B as released (the system: Mamba-2 LM with task LoRA, DINOv2 + SigLIP tower, projector, VQ-16),
    bf16 compute over fp32 weights, layers scanned and rematerialised for training."""
    from janusflow_jax.models.omnimamba import OmniMambaSystemConfig

    model = ml_collections.ConfigDict(OmniMambaSystemConfig().to_dict())
    model.lm.backbone.update(dict(dtype="bfloat16", param_dtype="float32", scan_layers=True, remat_policy="full"))
    return model


def tiny_model() -> ml_collections.ConfigDict:
    """A tiny system with the release's structure: LM `models.omnimamba.tiny_config()` (d 32, 2 layers, 96 text ids,
    48 image codes, 12 caption tokens, 4 x 4 codes, 9 image features), a two-backbone tower on 14 px images (4 px
    patches: 3 x 3 = 9), its projector and a 4x-downsampling VQ (4 x 4 codes <-> 16 px images)."""
    from janusflow_jax.models import dinosiglip, omnimamba, vit, vq

    lm = omnimamba.tiny_config()
    dino = vit.DINOV2_L_REG4_384.replace(image_size=14, patch_size=4, width=32, depth=3, num_heads=2, mlp_dim=64)
    siglip = vit.SIGLIP_SO400M_384.replace(image_size=14, patch_size=4, width=48, depth=3, num_heads=4, mlp_dim=96)
    tower = dinosiglip.DinoSigLIPConfig(dino=dino, siglip=siglip)
    system = omnimamba.OmniMambaSystemConfig(
        lm=lm, vision=tower, projector=dinosiglip.ProjectorConfig(tower.width, lm.d_model),
        vq=vq.VQConfig(codebook_size=lm.image_vocab_size, encoder_ch_mult=(1, 1, 2), decoder_ch_mult=(1, 1, 2),
                       z_channels=16, ch=16, norm_groups=8))
    return ml_collections.ConfigDict(system.to_dict())


def base_config(arg: str | None, *, stage: str, lr: float, warmup_steps: int, steps: int, batch_size: int,
                mixture, freeze, init_kind: str) -> ml_collections.ConfigDict:
    """A locked OmniMamba run config for one stage; `arg` selects a variant: None (the release's recipe at 1.3B,
    the 8 GPUs' global batch) or "tiny" (the tiny system on synthetic data, a few steps: seconds on a CPU)."""
    variant = arg or "full"
    if variant not in ("full", "tiny"):
        raise ValueError(f"unknown config variant {arg!r}: use no argument (the release's 1.3B run) or ':tiny'")
    c = ml_collections.ConfigDict()
    c.family = FAMILY
    c.stage = stage
    c.model = release_model() if variant == "full" else tiny_model()
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, dcn_data=1) if variant == "full"
                                       else dict(data=-1, fsdp=1, tensor=1, dcn_data=1))
    c.init = ml_collections.ConfigDict(dict(kind=init_kind if variant == "full" else "random", path="", mmu_path="",
                                            t2i_path="", llm_path="", weights="params"))
    c.freeze = tuple(freeze)
    c.steps = steps
    c.optimizer = ml_collections.ConfigDict(dict(lr=lr, warmup_steps=warmup_steps, decay="cosine",
                                                 final_fraction=0.01, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
                                                 clip_norm=1.0, ema_decay=0.0))
    c.optimizer.total_steps = c.get_ref("steps")  # the cosine ends at the last step
    c.batch_size = batch_size
    c.micro_batches = 1
    c.mixture = tuple(mixture)
    c.data = data_lib.default_config()
    c.data.update(dict(source="synthetic", mmu_len=453, pad_id=RELEASE_PAD_ID, eos_id=0, num_workers=8, prefetch=4))
    c.loss = ml_collections.ConfigDict(dict(mmu_weight=1.0, t2i_weight=1.0, cfg_drop=0.0))
    c.loss.pad_id = c.data.get_ref("pad_id")
    c.seed = 0
    c.log_every = 50
    c.checkpoint_every = 5000  # the release's save_steps
    c.keep_checkpoints = 5  # its save_total_limit
    c.max_consecutive_skips = 20
    # Persistent compilation cache (janusflow_jax/train/compilation_cache.py): "" = <workdir>/compilation_cache, a
    # local or gs:// directory every host reads, or "off". A relaunch loads what it compiled before.
    c.compilation_cache = ""
    # XLA options for the train step on TPUs (train/step.py `compiler_options`). Without windowed einsums XLA:TPU
    # gathers each FSDP weight and runs one matmul, instead of a loop over the weight's shards that reads and writes
    # the [tokens, 4096] output once per step of the loop: on v5p-16 the 1.3B stage-2 step's roofline drops from
    # 866 to 741 ms (BENCHMARKS.md). The gathers are asynchronous; a measured step on a TPU should confirm.
    c.xla_tpu_flags = ("--xla_tpu_enable_windowed_einsum_for_all_gather=false "
                       "--xla_tpu_enable_windowed_einsum_for_reduce_scatter=false")
    # A host on which no step completes within the bound exits (train/watchdog.py): seconds > 0 fixed, 0 derived
    # (step_multiple x the median step, at least floor_seconds; compiles and evaluations not counted), < 0 off.
    c.watchdog = ml_collections.ConfigDict(dict(seconds=0.0, floor_seconds=300.0, step_multiple=20.0))
    c.eval_every = 0
    c.eval = ml_collections.ConfigDict(dict(evaluators=(), data_dir="", batch_size=0, batches=2, seed=0))
    if variant == "tiny":  # seconds on a CPU: the tiny system, 16 rows of short sequences, 6 steps
        c.steps = 6
        c.optimizer.warmup_steps = 2
        c.optimizer.lr = 1e-3
        # Both tasks at 1:1 where the stage mixes them (3:48 would round the 16 rows to no understanding row).
        c.mixture = tuple((min(until, 2) if i < len(mixture) - 1 else c.steps, tuple(1 if r else 0 for r in ratio))
                          for i, (until, ratio) in enumerate(mixture))
        c.batch_size = 16
        c.data.update(dict(mmu_len=20, pad_id=TINY_PAD_ID, num_workers=0))
        c.log_every = 1
        c.checkpoint_every = 2
    c.lock()
    return c
