"""Evaluators inside training, as big_vision runs them: the config names them (`eval.evaluators`), the loop calls
`Evaluators.run` every `eval_every` steps (and at the last step) on the EMA weights, and each returns scalars and
images that go to TensorBoard (`eval/<name>`), <workdir>/eval/metrics.jsonl and PNGs in <workdir>/eval/.

  losses         held-out AR / rectified-flow / REPA losses on fixed batches with fixed noise (losses.py)
  samples        a sample grid for fixed prompts and seeds (samples.py)
  understanding  a small benchmark file answered and scored by the offline rules (understanding.py)

An evaluator is a class built once from the run's plan (`cls(plan)`, where it reads `config.eval` and fails early
with a TrainingError naming the missing field) and called as `evaluator(step, params) -> {"scalars": {name: float},
"images": {name: uint8 [H, W, 3]}}`; every host calls it (the computations are SPMD), process 0 writes.
"""

from __future__ import annotations

import io
import sys
import time

import jax
from etils import epath

from janusflow_jax.train import optimizer
from janusflow_jax.train.plan import TrainingError


def _registry() -> dict:
    from janusflow_jax.eval.losses import HeldOutLosses
    from janusflow_jax.eval.samples import SampleGrid
    from janusflow_jax.eval.understanding import UnderstandingSet

    return {cls.name: cls for cls in (HeldOutLosses, SampleGrid, UnderstandingSet)}


def eval_params(state: dict) -> dict:
    """The weights evaluated: the EMA of the trainable parameters (the raw ones when the run keeps no EMA) with the
    frozen ones."""
    return optimizer.merge(state["ema"] if state["ema"] else state["trainable"], state["frozen"])


class Evaluators:
    """The run's evaluators, their schedule and their outputs."""

    def __init__(self, plan, workdir, writer=None):
        config = plan.config
        self.every, self.last = int(config.eval_every), int(config.steps)
        registry = _registry()
        unknown = [n for n in config.eval.evaluators if n not in registry]
        if unknown:
            raise TrainingError(f"unknown evaluator(s) {unknown} in eval.evaluators (known: {', '.join(registry)})")
        self.evaluators = [registry[name](plan) for name in config.eval.evaluators]
        self.writer = writer
        self.active = jax.process_index() == 0
        self.out = epath.Path(workdir) / "eval"  # a gs:// workdir keeps everything there
        if self.active:
            from janusflow_jax.train.metrics import JsonLines

            self.out.mkdir(parents=True, exist_ok=True)
            self.metrics = JsonLines(self.out / "metrics.jsonl", start=sys.maxsize)  # earlier rows kept

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.last

    def run(self, step: int, state: dict) -> dict:
        """Runs every evaluator on the EMA weights of `state`; returns the scalars ({"<evaluator>/<name>": value})."""
        start = time.perf_counter()
        params = eval_params(state)
        scalars, images = {}, {}
        for evaluator in self.evaluators:
            result = evaluator(step, params)
            scalars.update({f"{evaluator.name}/{k}": v for k, v in result.get("scalars", {}).items()})
            images.update(result.get("images", {}))
        seconds = time.perf_counter() - start
        if self.active:
            self._write(step, scalars, images, seconds)
        return scalars

    def _write(self, step: int, scalars: dict, images: dict, seconds: float):
        from PIL import Image

        self.metrics.write({"step": step, **scalars, "seconds": seconds})
        self.metrics.flush()  # on an object store: the file rewritten whole (eval rows are few)
        for name, image in images.items():
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            (self.out / f"{name}_{step:07d}.png").write_bytes(buffer.getvalue())
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(f"eval/{key}", value, step)
            for name, image in images.items():
                self.writer.add_image(f"eval/{name}", image, step, dataformats="HWC")
            self.writer.flush()
        shown = {k: v for k, v in scalars.items() if "_t" not in k.split("/")[-1]}  # the per-t values: TB only
        print(f"eval step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in shown.items()) + f" ({seconds:.1f} s)")


def from_config(plan, workdir, writer=None) -> Evaluators | None:
    """The run's evaluators, or None when `eval_every` is 0 (or the config has no eval fields)."""
    if not plan.config.get("eval_every", 0):
        return None
    return Evaluators(plan, workdir, writer)
