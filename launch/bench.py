"""Benchmark training throughput and sampling speed, side by side with PyTorch eager.

  python -m launch.bench MODE --config=stage2:tiny [--steps=10 --warmup=2 --batch_sizes=1,8 --sample_steps=30
                         --cfg=2.0 --reps=3 --torch_threads=0 --profile_dir=DIR] [--out_dir=runs/bench]
                         [--update_benchmarks]

  python -m launch.bench race [--race_parts=sweep,image,aot --race_lengths=512,1024,... --race_layers=4,2
                               --race_targets=h200,v5p:2x2x1 --race_memory_budget_gib=8 --race_time_budget=90]

MODE: train | sample | torch | vae | data | all (= train + sample + torch; see janusflow_jax/perf/bench.py) | race
(OmniMamba's Mamba-2 against JanusFlow's Llama over sequence lengths; janusflow_jax/perf/race.py; no --config). Config overrides
work as in launch.train (--config.batch_size=32, --config.model.llm.num_layers=4, ...). The report is printed as
tables and saved to --out_dir (default runs/bench under the current directory, ignored by git): its JSON and its
tables as markdown, under one name (<mode>_<config>_<UTC time>). The repository is written only with
--update_benchmarks: the JSON joins benchmarks/ beside --benchmarks_md and that file's section is rewritten from them.
"""

from __future__ import annotations

import shlex
import sys

from absl import flags
from ml_collections import config_flags

from launch import config_cli

__doc__ = config_cli.with_config_list(__doc__)

_CONFIG = config_flags.DEFINE_config_file("config", None, config_cli.CONFIG_HELP,
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "train: timed steps (the median is reported); data: timed batches.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "train: untimed steps after compilation; data: untimed batches.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8"], "sample: batch sizes (torch mode uses the largest).")
_SAMPLE_STEPS = flags.DEFINE_list("sample_steps", ["30"], "sample: Euler step counts (torch mode uses the first).")
_CFG = flags.DEFINE_list("cfg", ["2.0"], "sample: CFG weights (torch mode uses the first).")
_VAE_DTYPES = flags.DEFINE_list("vae_dtypes", ["bfloat16"], "vae: compute dtypes (bfloat16, float32).")
_REPS = flags.DEFINE_integer("reps", 3, "sample/torch: timed repetitions (torch: alternating JAX/PyTorch).")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0 = torch's default).")
_NOTE = flags.DEFINE_string("note", "", "A remark stored and printed with the report (what was special about it).")
_RACE_PARTS = flags.DEFINE_list("race_parts", ["sweep"], "race: sweep (this host, reduced depth), image (per-image "
                                 "latency at the shipped settings), aot (full depth compiled for --race_targets).")
_RACE_LENGTHS = flags.DEFINE_list("race_lengths", [str(2 ** k) for k in range(9, 17)],
                                  "race: sequence lengths (tokens).")
_RACE_LAYERS = flags.DEFINE_list("race_layers", ["4", "2"], "race: Mamba-2 and Llama layers for sweep and image "
                                 "(full depth: 48, 24).")
_RACE_TARGETS = flags.DEFINE_list("race_targets", ["h200", "v5p:2x2x1"], "race aot: GPU targets or TPU topologies "
                                  "(the first chip is compiled for); needs JAX's CUDA plugin / libtpu.")
_RACE_WIDTH = flags.DEFINE_integer("race_width", 2048, "race sweep: d_model of both backbones (2048: the releases; "
                                   "smaller: narrow stand-ins for tests, see race.mamba_config).")
_RACE_MODELS = flags.DEFINE_list("race_models", ["mamba", "llama"], "race aot: which backbones to compile (the "
                                  "section takes the other's rows from an older report).")
_RACE_BATCH = flags.DEFINE_integer("race_batch", 1, "race: rows per call.")
_RACE_MEMORY = flags.DEFINE_float("race_memory_budget_gib", 8.0, "race sweep: points whose compiled plan is larger are "
                                  "not run (this host is shared).")
_RACE_TIME = flags.DEFINE_float("race_time_budget", 90.0, "race sweep: points predicted to take longer per call (the "
                                "previous length's time scaled by the counted FLOPs) are not run.")
_OUT_DIR = flags.DEFINE_string("out_dir", "runs/bench", "Directory for this run's report (JSON + markdown); local or "
                                "gs://, relative to the current directory.")
_UPDATE = flags.DEFINE_bool("update_benchmarks", False, "Also publish the report: its JSON into the benchmarks/ "
                            "folder beside --benchmarks_md, and that file's bench (or race) section rewritten.")
_BENCHMARKS_MD = flags.DEFINE_string("benchmarks_md", str(config_cli.CONFIG_DIR.parent / "BENCHMARKS.md"),
                                     "With --update_benchmarks: the markdown file to update (default: the "
                                     "repository's).")
_PROFILE_DIR = flags.DEFINE_string("profile_dir", "", "train/all: also trace 3 train steps with jax.profiler into "
                                   "this directory (XProf + Perfetto files) and print where the time goes.")


def _label(argv: list[str]) -> str:
    """The config as typed plus its overrides: the key that groups reports in BENCHMARKS.md."""
    parts = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    parts += [a[len("--config."):] for a in argv if a.startswith("--config.")]
    return " ".join(parts) or "?"


def main(argv) -> int:
    from janusflow_jax import paths

    try:  # a missing bucket or missing credentials: one line now, not after the measurements
        paths.check_access(_OUT_DIR.value, _BENCHMARKS_MD.value if _UPDATE.value else None, _PROFILE_DIR.value)
    except paths.RemoteAccessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from janusflow_jax.perf import bench, bench_report

    modes = (*bench.MODES, "race")
    if len(argv) != 2 or argv[1] not in modes:
        print(f"error: give exactly one mode ({', '.join(modes)}), got {argv[1:]}", file=sys.stderr)
        return 2
    if argv[1] == "race":
        return _race()
    if _CONFIG.value is None:
        print("error: --config is required (e.g. --config=stage2:tiny)", file=sys.stderr)
        return 2
    try:
        batch_sizes = [int(b) for b in _BATCH_SIZES.value]
        sample_steps = [int(s) for s in _SAMPLE_STEPS.value]
        cfgs = [float(c) for c in _CFG.value]
    except ValueError as e:
        print(f"error: --batch_sizes/--sample_steps need integers and --cfg numbers: {e}", file=sys.stderr)
        return 2
    if not batch_sizes or not sample_steps or not cfgs:
        print("error: --batch_sizes, --sample_steps and --cfg need at least one value", file=sys.stderr)
        return 2
    config = paths.resolve_config_paths(_CONFIG.value)
    profile_dir = paths.resolve(_PROFILE_DIR.value)
    raw = sys.argv[1:]
    command = "python -m launch.bench " + " ".join(shlex.quote(a) for a in raw)
    try:
        report = bench.run(argv[1], config, label=_label(raw), command=command, steps=_STEPS.value,
                           warmup=_WARMUP.value, batch_sizes=batch_sizes, sample_steps=sample_steps, cfgs=cfgs,
                           reps=_REPS.value, torch_threads=_TORCH_THREADS.value, note=_NOTE.value,
                           vae_dtypes=_VAE_DTYPES.value, profile_dir=profile_dir or None)
    except (bench.BenchError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return _publish(report, bench_report.format_report(report), "bench", bench_report.write_markdown)


def _race() -> int:
    from janusflow_jax.perf import race, race_report

    try:
        lengths = [int(n) for n in _RACE_LENGTHS.value]
        mamba_layers, llama_layers = (int(n) for n in _RACE_LAYERS.value)
    except ValueError as e:
        print(f"error: --race_lengths needs integers and --race_layers two integers (Mamba, Llama): {e}",
              file=sys.stderr)
        return 2
    raw = sys.argv[1:]
    command = "python -m launch.bench " + " ".join(shlex.quote(a) for a in raw)
    label = f"race {'+'.join(_RACE_PARTS.value)} layers {mamba_layers}/{llama_layers}" + (
        f" targets {','.join(_RACE_TARGETS.value)}" if "aot" in _RACE_PARTS.value else "") + (
        f" models {','.join(_RACE_MODELS.value)}" if "aot" in _RACE_PARTS.value and len(_RACE_MODELS.value) < 2 else "")
    try:
        report = race.run(label=label, command=command, lengths=lengths, mamba_layers=mamba_layers,
                          llama_layers=llama_layers, parts=_RACE_PARTS.value, targets=_RACE_TARGETS.value,
                          batch=_RACE_BATCH.value, reps=_REPS.value, memory_budget_gib=_RACE_MEMORY.value,
                          time_budget=_RACE_TIME.value, note=_NOTE.value, width=_RACE_WIDTH.value,
                          models=_RACE_MODELS.value)
    except ValueError as e:  # race.RaceError and bad sizes
        print(f"error: {e}", file=sys.stderr)
        return 1
    return _publish(report, race_report.format_report(report), "race",
                    lambda md, json_dir: race_report.write_markdown(md, json_dir, json_dir / race_report.PLOT_NAME))


def _publish(report: dict, text: str, section: str, write_section) -> int:
    """Prints the report's tables (`text`) and saves them with its JSON in --out_dir; with --update_benchmarks also
    saves the JSON into benchmarks/ beside --benchmarks_md and rewrites that file's `section` section
    (`write_section(md, json_dir)`). A write failure is one line and exit status 1."""
    from janusflow_jax import paths
    from janusflow_jax.perf import report as report_lib

    print(text)
    try:
        json_path, md_path = report_lib.save(report, text, paths.resolve(_OUT_DIR.value))
        print(f"saved {json_path} and {md_path.name}")
        if _UPDATE.value:
            md = paths.user_path(_BENCHMARKS_MD.value)
            json_dir = md.parent / "benchmarks"
            print(f"saved {report_lib.save_json(report, json_dir)}")
            write_section(md, json_dir)
            print(f"updated the {section} section of {md}")
    except OSError as e:
        print(f"error: cannot write the results: {e}", file=sys.stderr)
        return 1
    return 0


def run():
    config_cli.run(main)


if __name__ == "__main__":
    run()
