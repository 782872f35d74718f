"""The run config of a training stage: the defaults that `configs/stage{1,2,3}.py` fill in with Table 1.

Fields (all overridable from the command line, e.g. `--config.optimizer.lr=3e-5`; an unknown field is an error):
  stage                 1, 2 or 3 (informational; the freeze rules below decide what trains)
  model                 the JanusFlowConfig fields (configs/janusflow_1_3b.py or configs/tiny.py)
  mesh                  data / fsdp / tensor sizes (-1 = all remaining devices) within a slice, and dcn_data: slices
                        of a multi-slice pod that the data axis also spans over the data-center network (1: one slice)
  init                  kind: "random" | "checkpoint" (our orbax root: a converted release or a previous stage;
                        `weights` ema|params) | "official" (an official PyTorch directory) | "parts" (stage 1: HF
                        Llama dir `llm_path` + timm SigLIP `siglip_path`, the new parts random)
  freeze                ordered (regex, "trainable" | "frozen") rules over '/'-joined parameter paths; first match
                        wins; every parameter must match one (see optimizer.py)
  optimizer             AdamW lr, warmup_steps, b1, b2, eps, weight_decay, clip_norm (global norm), ema_decay
  loss                  ar/rf/repa weights, t sampling (logit_normal mean/std or uniform), cfg_drop (prompt dropout)
  batch_size            global examples per step, split by `mixture`
  micro_batches         gradient accumulation: the batch runs in this many sequential pieces, one update
  mixture               ((until_step, (und, gen, text)), ...): the data ratio in force up to each step
  steps                 total optimizer steps
  data                  source "synthetic" | "prepared" (+ loader fields of janusflow_jax/data/loader.py), seq_len (packed
                        understanding/text rows), prompt_len (generation prompts, left-padded), images_per_row
  seed, log_every, checkpoint_every, keep_checkpoints, max_consecutive_skips
  xla_tpu_flags         XLA options for the train step when it compiles for TPUs ("--name=value ...", as in
                        LIBTPU_INIT_ARGS, but part of the program: launch.train and launch.compile alike)
  watchdog              a host on which no step completes within the bound exits (train/watchdog.py)
  eval_every, eval      evaluators on the EMA weights every eval_every steps (0 = off): held-out losses, a sample
                        grid, a scored understanding set (janusflow_jax/eval/evaluators.py)
"""

from __future__ import annotations

import ml_collections

from configs import janusflow_1_3b, tiny
from janusflow_jax.data import loader as data_lib


def base_config(arg: str | None, *, stage: int, lr: float, warmup_steps: int, steps: int, batch_size: int,
                mixture, freeze, init_kind: str) -> ml_collections.ConfigDict:
    """A locked run config for one stage; `arg` selects a variant: None (1.3B as in the paper) or "tiny" (a few
    steps of the tiny model on synthetic data, for tests and a first look on a laptop)."""
    variant = arg or "full"
    if variant not in ("full", "tiny"):
        raise ValueError(f"unknown config variant {arg!r}: use no argument (the paper's 1.3B run) or ':tiny'")
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.model = janusflow_1_3b.model_config() if variant == "full" else tiny.model_config()
    # Pods: FSDP over every chip (ZeRO-3 style) fits the 1.3B model with room for 4k-token rows.
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, dcn_data=1) if variant == "full"
                                       else dict(data=-1, fsdp=1, tensor=1, dcn_data=1))
    c.init = ml_collections.ConfigDict(dict(kind=init_kind if variant == "full" else "random", path="", llm_path="",
                                            siglip_path="", weights="ema"))
    c.freeze = tuple(freeze)
    c.optimizer = ml_collections.ConfigDict(dict(lr=lr, warmup_steps=warmup_steps, b1=0.9, b2=0.95, eps=1e-8,
                                                 weight_decay=0.0, clip_norm=1.0, ema_decay=0.99))
    c.loss = ml_collections.ConfigDict(dict(ar_weight=1.0, rf_weight=1.0, repa_weight=1.0, t_sampling="logit_normal",
                                            t_mean=0.0, t_std=1.0, cfg_drop=0.1))
    c.batch_size = batch_size
    c.micro_batches = 1
    c.mixture = tuple(mixture)
    c.steps = steps
    # The loader's own fields (dir, pack, posterior, workers, ...; janusflow_jax/data/loader.py) plus the batch geometry.
    # Rows of 1024 tokens with one image: an understanding example (578 image slots + ~45 system + question + answer)
    # averages ~810 tokens, so a row holds one example (17% padding, measured with data.pad_fraction) and the mixture
    # ratio counts examples, as Table 1 does. Packing 4096-token rows would need ~6 images per row (5% padding) and
    # would turn "72 understanding rows" into ~360 examples; text-only rows still pack several documents.
    c.data = data_lib.default_config()
    c.data.update(dict(source="synthetic", seq_len=1024, prompt_len=128, images_per_row=1, num_workers=8, prefetch=4))
    c.seed = 0
    c.log_every = 50
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.max_consecutive_skips = 20
    # Persistent compilation cache (janusflow_jax/train/compilation_cache.py): "" = <workdir>/compilation_cache, a
    # local or gs:// directory every host reads, or "off". A relaunch loads what it compiled before.
    c.compilation_cache = ""
    # XLA options for the train step on TPUs (train/step.py `compiler_options`); none measured for JanusFlow.
    c.xla_tpu_flags = ""
    # A host on which no step completes within the bound exits (train/watchdog.py): seconds > 0 fixed, 0 derived
    # (step_multiple x the median step, at least floor_seconds; compiles and evaluations not counted), < 0 off.
    c.watchdog = ml_collections.ConfigDict(dict(seconds=0.0, floor_seconds=300.0, step_multiple=20.0))
    # Evaluators inside training (janusflow_jax/eval/evaluators.py), on the EMA weights every eval_every steps and at
    # the last; 0 = off. Held-out losses need a prepared split of data the run does not train on (eval.data_dir);
    # the sample grid decodes in that data's latent space with its tokenizer.
    c.eval_every = 0
    c.eval = ml_collections.ConfigDict(dict(
        evaluators=("losses", "samples"),  # names in eval/evaluators.py; "understanding" adds a scored benchmark file
        data_dir="",  # held-out prepared split (launch.prepare_data); a synthetic run uses synthetic batches
        batch_size=0,  # rows per held-out batch (0 = batch_size), split at the last mixture phase's ratio
        batches=2,  # held-out batches per evaluation: the same ones every time
        t_grid=4,  # rectified flow and REPA at t = (k + 1/2) / t_grid for every generation row, from fixed noise
        seed=0,  # the held-out batches' order, their noise and the samples' noise
        sample_prompts=("a photo of a cat sitting on a sofa", "a red apple on a wooden table",
                        "a lighthouse on a cliff at sunset", "a bowl of ramen, studio lighting"),
        images_per_prompt=4,
        cfg=2.0,
        steps=30,
        tokenizer="",  # default: the tokenizer the held-out (or training) data was prepared with
        und_data="",  # understanding evaluator: a benchmark file (launch.evaluate und's formats)
        und_suite="gqa",  # its protocol and scorer (janusflow_jax/eval/prompts.py)
        und_limit=0,  # at most this many questions (0 = all)
        und_batch_size=8,
    ))
    if variant == "tiny":  # seconds on a CPU: the tiny model, 16 examples of short rows, 6 steps
        c.steps = 6
        c.optimizer.warmup_steps = 2
        c.optimizer.lr = 1e-3
        c.mixture = tuple((min(until, 2) if i < len(mixture) - 1 else c.steps, ratio)
                          for i, (until, ratio) in enumerate(mixture))
        c.batch_size = 16
        c.data.seq_len = 64
        c.data.prompt_len = 8
        c.data.num_workers = 0
        c.log_every = 1
        c.checkpoint_every = 2
        c.eval.steps = 2
        c.eval.images_per_prompt = 2
    c.lock()
    return c
