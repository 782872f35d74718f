"""A multi-stage recipe: stage 1 -> 2 -> 3 in one workdir, each stage initialised from the previous stage's EMA.

A recipe config is a stage config (configs/_base.py fields, shared by all stages) plus `recipe.stage1`, `recipe.stage2`,
... each naming what differs per stage: steps, lr, warmup_steps, ema_decay, mixture, freeze. Stage N trains in
<workdir>/stageN with `trainer.train` (so it resumes and checkpoints as any stage does); stage 1 starts from
`config.init`, stage N > 1 from <workdir>/stage{N-1}/checkpoints with weights="ema". A stage whose final step is
already saved is not touched again, so rerunning a recipe skips finished stages.
"""

from __future__ import annotations

import re
from typing import Callable

import ml_collections
from etils import epath

from janusflow_jax import paths

STAGE_FIELDS = ("steps", "lr", "warmup_steps", "ema_decay", "mixture", "freeze")
_RECIPE_ONLY = ("recipe", "digits")  # top-level fields a single stage's run config does not carry


def stage_names(config) -> list[str]:
    """The recipe's stages in order (stage1, stage2, ...)."""
    names = sorted(config.recipe.keys(), key=lambda n: int(re.fullmatch(r"stage(\d+)", n).group(1))
                   if re.fullmatch(r"stage(\d+)", n) else -1)
    bad = [n for n in names if not re.fullmatch(r"stage\d+", n)]
    if bad or not names:
        raise ValueError(f"config.recipe must hold stage1, stage2, ... entries, got {sorted(config.recipe.keys())}")
    return names


def stage_config(config, name: str, init_path: str | None, data_dir: str | None = None) -> ml_collections.ConfigDict:
    """The single-stage run config of stage `name`: the shared fields with the stage's own fields in place."""
    stage = config.recipe[name]
    missing = [f for f in STAGE_FIELDS if f not in stage]
    if missing:
        raise ValueError(f"config.recipe.{name} lacks {missing}")
    c = ml_collections.ConfigDict({k: v for k, v in config.to_dict().items() if k not in _RECIPE_ONLY})
    c.stage = int(name[len("stage"):])
    c.steps = stage.steps
    c.optimizer.lr = stage.lr
    c.optimizer.warmup_steps = stage.warmup_steps
    c.optimizer.ema_decay = stage.ema_decay
    c.mixture = tuple((int(until), tuple(ratio)) for until, ratio in stage.mixture)
    c.freeze = tuple(tuple(rule) for rule in stage.freeze)
    if init_path is not None:
        c.init.kind, c.init.path, c.init.weights = "checkpoint", init_path, "ema"
    if data_dir is not None:
        c.data.dir = data_dir
    c.lock()
    return c


def finished(stage_dir, steps: int) -> bool:
    """Whether the stage's final step is saved and complete (as orbax counts it: on gs:// a step's folder exists
    while it is written, so the folder alone does not say)."""
    from janusflow_jax import checkpoint as checkpoint_lib

    root = epath.Path(stage_dir) / "checkpoints"
    if not root.is_dir():
        return False
    with checkpoint_lib.manager(root, create=False) as mngr:
        return steps in mngr.all_steps()


def run_stages(config, workdir, *, data_dir: str | None = None, progress: bool = True,
               after_stage: Callable[[str, epath.Path], None] | None = None) -> list[epath.Path]:
    """Trains every stage of the recipe in order (skipping finished ones); calls after_stage(name, stage_dir) after
    each. Returns the stage directories (local or gs://, as `workdir`)."""
    import jax

    from janusflow_jax.train import loop as trainer

    say = print if jax.process_index() == 0 else (lambda *_: None)
    workdir = paths.user_path(workdir)
    dirs, previous = [], None
    for name in stage_names(config):
        stage_dir = workdir / name
        c = stage_config(config, name, None if previous is None else str(previous / "checkpoints"), data_dir)
        if finished(stage_dir, c.steps):
            say(f"{name}: finished earlier ({stage_dir / 'checkpoints' / str(c.steps)})")
        else:
            say(f"{name}: {c.steps} steps, lr {c.optimizer.lr:g}, mixture {c.mixture}, init "
                f"{c.init.kind}{' ' + c.init.path if c.init.kind == 'checkpoint' else ''}")
            trainer.train(c, stage_dir, progress=progress)
        if after_stage is not None:
            after_stage(name, stage_dir)
        dirs.append(stage_dir)
        previous = stage_dir
    return dirs
