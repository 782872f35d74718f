"""`launch.train` end to end from the command line; a preempted and then killed run resumes bitwise equal to an
uninterrupted one.

Every run is stage2:tiny with one block per tower (quicker compiles; the run is what is tested, not the depth). The
processes share a persistent compilation cache, so only the first compiles the steps (both mixture phases, three batch
compositions: the 30:50:20 -> 14:80:6 switch happens at step 2)."""

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).parents[1]

ONE_BLOCK = {"model.llm.num_layers": 1, "model.und_encoder.depth": 1, "model.repa.layer": 1,
             "model.gen_encoder.num_blocks": 1, "model.gen_decoder.num_blocks": 1}
FLAGS = tuple(f"--config.{k}={v}" for k, v in ONE_BLOCK.items())
CONFIG = f"""
from configs import stage2

def run_config():
    config = stage2.get_config("tiny")
    for key, value in {ONE_BLOCK!r}.items():
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config
"""

# launch.train's loop with one fault: "sigterm" (a preemption notice after `step`: the run saves that step and exits
# cleanly) or "sigkill" (after `step`: no cleanup, no final save, as a crashed host).
FAULT = CONFIG + """
import os, signal, sys
from janusflow_jax.train import loop as trainer

workdir, kind, at = sys.argv[1:]

def fault(step, state, metrics):
    if step == int(at):
        os.kill(os.getpid(), signal.SIGTERM if kind == "sigterm" else signal.SIGKILL)

trainer.train(run_config(), workdir, callbacks=[fault], progress=False)
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from tests.cli_helpers import user_env

    return user_env()


def _train(env, *args):
    return subprocess.run([sys.executable, "-m", "launch.train", *args, "--progress=false"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _params(workdir, weights):
    from janusflow_jax import checkpoint

    return checkpoint.load_params(workdir / "checkpoints", weights=weights)[1]


def _fault(env, workdir, kind, step):
    return subprocess.run([sys.executable, "-c", FAULT, str(workdir), kind, str(step)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # three training processes
def test_train_cli_runs_and_resumes_exactly_after_preemption_and_sigkill(env, tmp_path):
    full = tmp_path / "full"
    result = _train(env, "--config=stage2:tiny", f"--workdir={full}", *FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 6 and "ar " in lines[0] and "tok/s" in lines[0] and "MFU" in lines[0]
    assert all("(input " in line for line in lines)  # the host's time to get each batch is reported
    assert sorted(p.name for p in (full / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4", "6"]
    assert (full / "loss_curve.png").stat().st_size > 0 and list((full / "tensorboard").iterdir())
    assert "done: final loss" in result.stdout

    # SIGTERM after step 3 (what a TPU maintenance event or `kill` sends): the run saves step 3 and exits cleanly.
    killed = tmp_path / "killed"
    preempted = _fault(env, killed, "sigterm", 3)
    assert preempted.returncode == 0, preempted.stderr[-3000:]
    assert "preempted: saved step 3" in preempted.stdout
    assert sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
    # Relaunched, it resumes at step 3 and is killed -9 after step 5: step 4's asynchronous save committed, or was cut
    # off mid-write (a loaded host) and the last relaunch resumes from step 3 again.
    crash = _fault(env, killed, "sigkill", 5)
    assert crash.returncode == -9, crash.stderr[-3000:]
    committed = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert committed in ([2, 3], [2, 3, 4]), committed
    resumed = _train(env, "--config=configs/stage2.py:tiny", f"--workdir={killed}", *FLAGS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step {committed[-1]}" in resumed.stdout
    for weights in ("params", "ema"):
        a, b = _params(full, weights), _params(killed, weights)
        assert jax.tree.structure(a) == jax.tree.structure(b)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y)
    ema, raw = _params(full, "ema"), _params(full, "params")
    assert not np.array_equal(ema["gen_decoder"]["input_norm"]["scale"], raw["gen_decoder"]["input_norm"]["scale"])
    np.testing.assert_array_equal(ema["und_encoder"]["norm"]["scale"], raw["und_encoder"]["norm"]["scale"])  # frozen

    # The trained checkpoint exports to the official layout with its EMA weights (launch.convert's default).
    from safetensors.numpy import load_file

    from launch.convert import to_torch

    to_torch(str(tmp_path / "export"), ckpt=str(full / "checkpoints"))
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    np.testing.assert_array_equal(exported["vision_gen_dec_model.input_norm.weight"],
                                  ema["gen_decoder"]["input_norm"]["scale"])


def test_train_cli_user_errors_are_one_line(env, tmp_path):
    unknown = _train(env, "--config=stage2:tiny", "--config.optimizer.not_a_field=1", f"--workdir={tmp_path}")
    assert unknown.returncode != 0 and "not_a_field" in unknown.stderr and "Traceback" not in unknown.stderr
    missing = _train(env, "--config=stage9", f"--workdir={tmp_path}")
    assert missing.returncode != 0 and "no config 'stage9'" in missing.stderr and "Traceback" not in missing.stderr
    no_init = _train(env, "--config=stage2:tiny", "--config.init.kind=checkpoint", f"--workdir={tmp_path / 'x'}")
    assert no_init.returncode == 1 and "config.init.path" in no_init.stderr and "Traceback" not in no_init.stderr


NAN_DATA = CONFIG + """
import sys
import numpy as np
from janusflow_jax.data import synthetic
from janusflow_jax.train import loop as trainer


class Poisoned(synthetic.SyntheticSource):  # every batch after the first two has NaN latents
    def take(self, sizes):
        batch = super().take(sizes)
        if self.phase > 0:
            batch["gen/latents"] = np.full_like(batch["gen/latents"], np.nan)
        return batch


synthetic.SyntheticSource = Poisoned
config = run_config()
config.max_consecutive_skips = 3
try:
    trainer.train(config, sys.argv[1], progress=False)
except trainer.TrainingError as e:
    print("STOPPED:", e)
"""


@pytest.mark.slow  # a training process
def test_consecutive_non_finite_steps_stop_the_run(env, tmp_path):
    run = subprocess.run([sys.executable, "-c", NAN_DATA, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "STOPPED: 3 consecutive steps had a non-finite loss" in run.stdout
    assert "[non-finite: update skipped]" in run.stdout
    # Skipped updates change no weight: the checkpoint taken mid-streak (step 4) holds step 2's parameters and EMA.
    from janusflow_jax import checkpoint

    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert "last good checkpoint is step 4" in run.stdout
    for weights in ("params", "ema"):
        good = checkpoint.load_params(tmp_path / "checkpoints", step=2, weights=weights)[1]
        kept = checkpoint.load_params(tmp_path / "checkpoints", step=4, weights=weights)[1]
        for x, y in zip(jax.tree.leaves(good), jax.tree.leaves(kept)):
            np.testing.assert_array_equal(x, y)


def test_out_of_device_memory_is_one_line():
    """A device OOM (what batch 32 with XLA attention hit on one H200) is reported as one line naming the knobs."""
    import jax

    from launch import config_cli

    e = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 43.93GiB with "
                                   "allocator GPU_0_bfc on device 0.\nmore detail")
    message = config_cli.out_of_memory(e)
    assert message.startswith("error: out of device memory (RESOURCE_EXHAUSTED") and "\n" not in message
    assert "--config.micro_batches" in message
    assert config_cli.out_of_memory(ValueError("RESOURCE_EXHAUSTED")) is None
    assert config_cli.out_of_memory(jax.errors.JaxRuntimeError("INTERNAL: something else")) is None

    def oom(argv):  # what every launch/*.py main runs under (config_cli.run)
        raise e

    assert config_cli._oom_as_message(oom)([]) == 1
    with pytest.raises(ValueError):
        config_cli._oom_as_message(lambda argv: (_ for _ in ()).throw(ValueError("x")))([])
