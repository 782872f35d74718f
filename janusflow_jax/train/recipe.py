"""A multi-stage recipe: stage 1 -> 2 -> 3 in one workdir, each stage initialised from the previous stage's EMA.

A recipe config is a stage config (configs/_base.py fields, shared by all stages) plus `recipe.stage1`, `recipe.stage2`,
... each naming what differs per stage: steps, lr, warmup_steps, ema_decay, mixture, freeze. Stage N trains in
<workdir>/stageN with `trainer.train` (so it resumes and checkpoints as any stage does); stage 1 starts from
`config.init`, stage N > 1 from <workdir>/stage{N-1}/checkpoints with weights="ema". A stage whose final step is
already saved is not touched again, so rerunning a recipe skips finished stages.

Stage names may carry a suffix (OmniMamba's stage1_mmu, stage1_t2i, stage2: run in the order of their number, then
suffix), and a stage may say where it starts (`init`, optional): "" (the default above), "config" (`config.init` as
it is: two stage-1 runs from the same start) or "merge:<mmu stage>,<t2i stage>" (OmniMamba's stage 2: init.kind
"merge" of those two stages' checkpoints, `train/merge.py`). The run config's `stage` is the name without "stage",
of the type the config's own `stage` has (JanusFlow: an int; OmniMamba: a string).
"""

from __future__ import annotations

import re
from typing import Callable

import ml_collections
from etils import epath

from janusflow_jax import paths

STAGE_FIELDS = ("steps", "lr", "warmup_steps", "ema_decay", "mixture", "freeze")  # + optional `init`
_STAGE_NAME = re.compile(r"stage(\d+)(_\w+)?")
_RECIPE_ONLY = ("recipe", "digits")  # top-level fields a single stage's run config does not carry


def stage_names(config) -> list[str]:
    """The recipe's stages in order (stage1, stage2, ...)."""
    names = list(config.recipe.keys())
    bad = [n for n in names if not _STAGE_NAME.fullmatch(n)]
    if bad or not names:
        raise ValueError(f"config.recipe must hold stage1, stage2, ... entries (optionally suffixed: stage1_mmu), "
                         f"got {sorted(names)}")
    return sorted(names, key=lambda n: (int(_STAGE_NAME.fullmatch(n).group(1)), n))


def stage_init(config, name: str, previous, workdir) -> dict | None:
    """Where stage `name` starts, as `config.init` fields to set (None: `config.init` as it is); `previous`: the
    previous stage's directory (None for the first)."""
    spec = str(config.recipe[name].get("init", "") or "")
    if spec == "config" or (not spec and previous is None):
        return None
    if not spec:
        return dict(kind="checkpoint", path=str(previous / "checkpoints"), weights="ema")
    if spec.startswith("merge:") and len(spec[len("merge:"):].split(",")) == 2:
        mmu, t2i = spec[len("merge:"):].split(",")
        missing = [s for s in (mmu, t2i) if s not in config.recipe]
        if missing:
            raise ValueError(f"config.recipe.{name}.init={spec!r} names stages the recipe lacks: {missing}")
        root = paths.user_path(workdir)
        return dict(kind="merge", mmu_path=str(root / mmu / "checkpoints"), t2i_path=str(root / t2i / "checkpoints"),
                    weights="ema")
    raise ValueError(f"config.recipe.{name}.init={spec!r}: use '' (the previous stage), 'config' (config.init) or "
                     f"'merge:<mmu stage>,<t2i stage>'")


def stage_config(config, name: str, init_path: str | None, data_dir: str | None = None,
                 init: dict | None = None) -> ml_collections.ConfigDict:
    """The single-stage run config of stage `name`: the shared fields with the stage's own fields in place.
    init_path: start from this checkpoint's EMA; init: `config.init` fields to set instead (`stage_init`)."""
    stage = config.recipe[name]
    missing = [f for f in STAGE_FIELDS if f not in stage]
    if missing:
        raise ValueError(f"config.recipe.{name} lacks {missing}")
    c = ml_collections.ConfigDict({k: v for k, v in config.to_dict().items() if k not in _RECIPE_ONLY})
    suffix = name[len("stage"):]
    c.stage = suffix if isinstance(c.stage, str) else int(suffix)  # OmniMamba's stages are strings ("1_mmu", "2")
    c.steps = stage.steps
    c.optimizer.lr = stage.lr
    c.optimizer.warmup_steps = stage.warmup_steps
    if "total_steps" in c.optimizer:  # OmniMamba's cosine ends at the stage's last step (to_dict drops the reference)
        c.optimizer.total_steps = stage.steps
    c.optimizer.ema_decay = stage.ema_decay
    c.mixture = tuple((int(until), tuple(ratio)) for until, ratio in stage.mixture)
    c.freeze = tuple(tuple(rule) for rule in stage.freeze)
    if init_path is not None:
        c.init.kind, c.init.path, c.init.weights = "checkpoint", init_path, "ema"
    if init is not None:
        c.init.update(init)
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
        c = stage_config(config, name, None, data_dir, init=stage_init(config, name, previous, workdir))
        if finished(stage_dir, c.steps):
            say(f"{name}: finished earlier ({stage_dir / 'checkpoints' / str(c.steps)})")
        else:
            source = {"checkpoint": f" {c.init.path}", "merge": f" {c.init.get('mmu_path')} + "
                      f"{c.init.get('t2i_path')}"}.get(c.init.kind, "")
            say(f"{name}: {c.steps} steps, lr {c.optimizer.lr:g}, mixture {c.mixture}, init {c.init.kind}{source}")
            trainer.train(c, stage_dir, progress=progress)
        if after_stage is not None:
            after_stage(name, stage_dir)
        dirs.append(stage_dir)
        previous = stage_dir
    return dirs
