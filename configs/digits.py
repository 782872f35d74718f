"""The laptop run: a scaled-down JanusFlow trained through stages 1 -> 2 -> 3 on scikit-learn's handwritten digits.

  python -m launch.train --config=digits --workdir=runs/digits            # minutes on 2 CPU cores
  python -m launch.train --config=digits --workdir=runs/digits_norepa --config.loss.repa_weight=0
  python -m launch.train --config=digits:test --workdir=/tmp/digits       # seconds (the test's pipeline)

The 1,797 real 8 x 8 digits (sklearn.datasets.load_digits) are upscaled to 16 px and written as PNGs + JSON-lines
manifests (understanding "What digit is this?" -> "seven", generation "a handwritten seven" -> image, text-only
sentences about digits); `launch.prepare_data`'s job turns them into ArrayRecord shards in the download-free
`space_to_depth` latent space; then the three stages train as configs/stage{1,2,3}.py do (same freeze rules and
mixtures, each initialised from the previous stage's EMA weights) and the held-out 20% is evaluated
(examples/digits/pipeline.py). The top-level fields are those of a stage config and apply to every stage; `recipe.stageN`
holds what differs per stage (steps, lr, warmup, EMA decay, mixture, freeze rules), e.g.
`--config.recipe.stage2.steps=600`.

Grid constraint of REPA (model.py): the gen encoder's latent tokens (latent_size / gen_encoder.stride)^2 = (8 / 2)^2
= 16 must equal SigLIP's patches (image_size / patch_size)^2 = (16 / 4)^2 = 16.

Image geometry (docs/digits.md): 16 px, space_to_depth factor 2, so the latent is 8 x 8 x 12 and each latent token
(a 2 x 2 latent patch) carries 48 numbers into the gen encoder's 64 channels. At 32 px (factor 4: 8 x 8 x 48) a token
carries 192 numbers into 64 channels: two thirds of the noise z0 cannot pass the stride-2 patch conv, so the velocity
x - z0 cannot be predicted (rf loss floor 128/192 = 0.67) and that noise stays in every sample. 16 px still holds all
of an 8 x 8 digit.
"""

import ml_collections

from configs import stage1, stage2, stage3
from configs._base import base_config

IMAGE_SIZE = 16
PATCH_SIZE = 4  # SigLIP: (16 / 4)^2 = 16 patches, one per latent token (REPA)
LATENT_SIZE = 8  # space_to_depth factor 16 / 8 = 2: 3 x 2^2 = 12 latent channels


def model_config() -> ml_collections.ConfigDict:
    channels = 3 * (IMAGE_SIZE // LATENT_SIZE) ** 2
    return ml_collections.ConfigDict(dict(
        llm=dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4, num_kv_heads=4,
                 head_dim=32, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=128,
                 tie_word_embeddings=False),
        und_encoder=dict(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, width=64, depth=2, num_heads=2, mlp_dim=128,
                         layer_norm_eps=1e-6, attn_pool=True, model_name="siglip_digits"),
        gen_encoder=dict(in_channels=channels, channels=64, kernel_size=2, stride=2, padding=0, num_blocks=1,
                         norm_eps=1e-6, use_bias=True, ffn_factor=4),
        gen_decoder=dict(in_channels=64, channels=64, out_channels=channels, num_blocks=1, upsamples=1,
                         norm_eps=1e-6, use_bias=True, ffn_factor=4),
        repa=dict(hidden_dim=128, layer=2),
        latent_size=LATENT_SIZE,
        dtype="float32",
        param_dtype="float32",
        scan_layers=False,
        remat_policy="none",
    ))


def _stage(steps, lr, warmup_steps, ema_decay, mixture, freeze):
    return dict(steps=steps, lr=lr, warmup_steps=warmup_steps, ema_decay=ema_decay, mixture=tuple(mixture),
                freeze=tuple(freeze))


def get_config(arg=None) -> ml_collections.ConfigDict:
    """`arg`: None (the default run) or "test" (a handful of examples, 2 steps per stage: seconds)."""
    variant = arg or "default"
    if variant not in ("default", "test"):
        raise ValueError(f"unknown digits variant {arg!r}: use no argument or ':test'")
    c = base_config("tiny", stage=1, lr=1e-3, warmup_steps=20, steps=1, batch_size=16,
                    mixture=((1, (50, 50, 0)),), freeze=((r".*", "trainable"),), init_kind="random")
    with c.unlocked():
        c.model = model_config()
        c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
        # Said outright: base_config's tiny variant sets 16 whatever its batch_size argument is, and every run
        # recorded in docs/digits.md (including the earlier ones documented as "batch 32") trained with 16.
        c.batch_size = 16
        c.init.kind = "random"  # stage 1 only; later stages read the previous stage's EMA checkpoint
        c.optimizer.weight_decay = 0.0
        c.loss.cfg_drop = 0.1
        # Logit-normal t centred at sigmoid(-1) = 0.27 instead of 0.5 (SD3's rf/lognorm with a shifted location; the
        # paper does not state its mean). The prompt only matters while z_t still hides the digit, t below ~0.3 at
        # 16 px; with mean 0 few draws land there and the model learns to follow the prompt late (docs/digits.md).
        c.loss.t_mean = -1.0
        c.data.source = "prepared"
        c.data.dir = ""  # filled in by the recipe: <workdir>/data/prepared
        c.data.seq_len = 48  # one understanding example (~37 tokens) or a few sentences per row
        c.data.prompt_len = 16
        c.data.num_workers = 0
        c.data.prefetch = 2
        c.log_every = 25
        c.checkpoint_every = 100
        c.keep_checkpoints = 1
        # Evaluators inside training, off unless --config.eval_every=N: a grid for the ten digit prompts and the
        # held-out understanding set (data/eval/digits_und.tsv, filled in by the pipeline), scored as launch.evaluate
        # scores it. Held-out losses would need a prepared held-out split (eval.data_dir).
        c.eval.evaluators = ("samples", "understanding")
        names = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
        c.eval.sample_prompts = tuple(f"a handwritten {name}" for name in names)
        c.eval.images_per_prompt = 8
        c.eval.steps = 20
        c.eval.und_suite = "digits"
        # The paper's freeze rules, taken from the stage configs themselves.
        s1, s2, s3 = (stage.get_config("tiny") for stage in (stage1, stage2, stage3))
        # Stage lengths measured to fit 15 minutes on 2 shared CPU cores (docs/digits.md); ratios as in Table 1.
        c.recipe = ml_collections.ConfigDict(dict(
            stage1=_stage(100, 1e-3, 20, 0.95, ((100, (50, 50, 0)),), s1.freeze),
            stage2=_stage(2000, 1e-3, 50, 0.98, ((150, (30, 50, 20)), (2000, (14, 80, 6))), s2.freeze),
            stage3=_stage(400, 3e-4, 20, 0.98, ((400, (21, 70, 9)),), s3.freeze),
        ))
        c.digits = ml_collections.ConfigDict(dict(
            test_fraction=0.2,  # held out: never written to a training manifest
            max_examples=0,  # 0 = all 1,797 digits; else the first N of the shuffled set
            split_seed=0,
            eval_columns=10,  # generated images per prompted digit (sample grid columns, classifier votes)
            eval_cfg=(1.0, 2.0, 3.0),
            eval_steps=20,  # Euler steps of the sampler
            eval_max_test=0,  # 0 = the whole held-out split for understanding accuracy
            records_per_shard=512,
            eval_stages=("stage1", "stage2", "stage3"),  # evaluated (and a sample grid drawn) after these stages
        ))
        if variant == "test":
            c.batch_size = 16
            c.data.seq_len = 48
            c.log_every = 1
            c.checkpoint_every = 2
            # One mixture phase per stage, at ratios that 16 rows split exactly (8/8/0, 4/8/4, 4/10/2): every step
            # has the same composition, so one train-step compile per stage (data/mixture.py; the default run's
            # stage 2 has two phases and Table 1's ratios, a few compositions each).
            for name, mixture in (("stage1", ((2, (50, 50, 0)),)), ("stage2", ((2, (25, 50, 25)),)),
                                  ("stage3", ((2, (25, 62.5, 12.5)),))):
                c.recipe[name].steps = 2
                c.recipe[name].warmup_steps = 1
                c.recipe[name].mixture = mixture
            c.digits.max_examples = 60
            c.digits.eval_columns = 2
            c.digits.eval_cfg = (2.0,)
            c.digits.eval_steps = 2
            c.digits.eval_max_test = 8
            c.digits.records_per_shard = 32
            c.digits.eval_stages = ("stage3",)  # each evaluation compiles the sampler and chat: once is enough
    c.lock()
    return c
