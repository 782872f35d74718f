"""The digits run for OmniMamba (configs/omnimamba_digits.py): the JanusFlow digits run's data, judge and grids
(`pipeline.py`), OmniMamba's records, recipe and decoding.

Pipeline (`run`; every step skips work already done, so rerunning the command resumes):
  1. data     `pipeline.write_dataset`: the same PNGs, split and manifests (und.jsonl {"image", "question",
              "answer"} is read as the mmu input, gen.jsonl {"image", "caption": [two captions]} as the t2i input;
              the text-only manifest is not used: OmniMamba trains no text-only task).
  2. tokens   a word-level tokenizer over the same words laid out like gpt-neox-20b's
              (`omnimamba_processor.make_tokenizer`) + OmniMamba's processor files, in <workdir>/data/tokenizer.
  3. prepare  `prepare.run` with family "omnimamba" -> <workdir>/data/prepared; the job first fits the patch_kmeans
              codebook on the training images (<workdir>/data/prepared/patch_kmeans.npz) and codes every t2i image
              with it.
  4. stages   stage1_mmu and stage1_t2i from the same random start, stage2 from their merge (`recipe.run_stages`
              with each stage's `init`), in <workdir>/stage1_mmu, stage1_t2i, stage2.
  5. eval     after each stage: held-out understanding accuracy (greedy answers to "What digit is this?" through
              the tower, the projector and the compiled mmu decoding loop) and judge-recognised generation accuracy
              for each `eval_sampling` setting (the compiled t2i loop writes 16 codes, the codebook decodes them);
              <workdir>/eval.json and <workdir>/samples_<stage>.png. Each checkpoint root gets the tokenizer files
              and the codebook (patch_kmeans.npz).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from examples.digits.pipeline import (GEN_PROMPT, NAMES, QUESTION, _write_atomic, classifier_features, fit_judge,
                                      local_workdir, render, save_grid, vocabulary, write_dataset)

CODEBOOK = "patch_kmeans.npz"


def write_tokenizer(out: Path, caption_length: int, pad_id: int) -> Path:
    """OmniMamba's word-level tokenizer over the digits' words + processor settings in `out`; checks that its [PAD]
    is the config's data.pad_id."""
    from janusflow_jax.data.omnimamba_processor import PROCESSOR_CONFIG, OmniMambaProcessor, make_tokenizer

    if not (out / PROCESSOR_CONFIG).is_file():
        make_tokenizer(out, vocabulary())
        OmniMambaProcessor.from_pretrained(out, caption_length=caption_length).save_pretrained(out)
    processor = OmniMambaProcessor.from_pretrained(out)
    if processor.pad_id != pad_id:
        raise ValueError(f"the digits tokenizer's [PAD] is {processor.pad_id}, config data.pad_id is {pad_id}")
    return out


def prepare_config(config, data_root: Path, tokenizer: Path):
    """The `launch.prepare_data` job config (family omnimamba, patch_kmeans fitted) for the digits manifests."""
    import ml_collections

    from configs.prepare_data import prepare_config as job_fields

    job = ml_collections.ConfigDict()
    job.model = config.model
    job.prepare = job_fields(family="omnimamba", out=str(data_root / "prepared"), tokenizer=str(tokenizer),
                             t2i_jsonl=str(data_root / "gen.jsonl"), mmu_jsonl=str(data_root / "und.jsonl"),
                             mmu_len=config.data.mmu_len, gen_crop="center",
                             records_per_shard=config.digits.records_per_shard, num_threads=2,
                             encode_batch_per_device=64)
    job.prepare.image_tokenizer.update(dict(kind="patch_kmeans", fit=True, fit_images=config.digits.codebook_fit_images,
                                            path=str(data_root / "prepared" / CODEBOOK)))
    return job


# ------------------------------------------------------------------------------------------------------ evaluation
def understanding_accuracy(loaded, images: np.ndarray, labels: np.ndarray, batch_size: int = 64):
    """Greedy answers to QUESTION (the training layout "In: …\\nOut: ") for uint8 images [n, S, S, 3] through the
    tower, the projector and `generate_text`; accuracy of answer == the digit's name. Returns (accuracy, answers)."""
    import jax.numpy as jnp

    from janusflow_jax.inference.omnimamba import _features, generate_text

    processor = loaded.processor
    prompt = processor.mmu_prompt(QUESTION)
    answers = []
    for start in range(0, len(images), batch_size):
        rows = np.arange(start, start + batch_size) % len(images)  # same shape every batch: one compile
        pixels = jnp.asarray(images[rows], jnp.float32) / 255.0  # the records' resize-naive uint8 / 255
        features = _features(loaded.vision, loaded.projector, loaded.vision_params, loaded.projector_params, pixels)
        tokens, lengths = generate_text(loaded.model, loaded.params, np.stack([prompt] * len(rows)), features,
                                        eos_id=processor.eos_id, max_new_tokens=4)
        answers += [processor.decode(t[:n]) for t, n in zip(tokens, lengths)]
    answers = answers[:len(images)]
    correct = [a.strip().lower().rstrip(".") == NAMES[y] for a, y in zip(answers, labels)]
    return float(np.mean(correct)), answers


def generation_eval(loaded, codebook, judge, *, settings, columns: int, seed: int = 0) -> tuple[dict, dict]:
    """Images for "a handwritten <digit>" (0-9, `columns` each) for each (label, temperature, top_k, cfg) setting:
    codes from `text_to_image_codes`, pixels from the codebook, read by `judge`. Returns ({label: accuracy},
    {label: uint8 images [10 * columns, S, S, 3], digit-major})."""
    from janusflow_jax.inference.omnimamba import text_to_image_codes

    prompts = [GEN_PROMPT.format(name=n) for n in NAMES]
    wanted = np.repeat(np.arange(10), columns)
    accuracy, images = {}, {}
    for label, temperature, top_k, cfg in settings:
        codes = text_to_image_codes(loaded.model, loaded.params, loaded.processor, prompts,
                                    images_per_prompt=columns, batch_size=10 * columns, seed=seed,
                                    temperature=float(temperature), top_k=int(top_k), cfg=float(cfg))
        out = codebook.decode(codes.reshape(len(codes), -1))
        accuracy[label] = float(np.mean(judge.predict(classifier_features(out)) == wanted))
        images[label] = out
    return accuracy, images


def evaluate(checkpoint_root: Path, split: dict, cfg, *, title: str, grid_path: Path) -> dict:
    """Understanding + generation accuracy of the weights in `checkpoint_root` (which holds the tokenizer and the
    codebook, `finish_checkpoint`); writes the sample grid."""
    from sklearn.datasets import load_digits

    from janusflow_jax.data.omnimamba_records import PatchKMeans
    from janusflow_jax.inference.load import load_omnimamba

    start = time.perf_counter()
    loaded = load_omnimamba(checkpoint_root)
    codebook = PatchKMeans.load(checkpoint_root / CODEBOOK)
    digits = load_digits()
    size = loaded.config.vision.image_size
    train, test = np.asarray(split["train"]), np.asarray(split["test"])
    if cfg.eval_max_test:
        test = test[:cfg.eval_max_test]
    test_images = np.stack([render(digits.images[i], size) for i in test])
    und_acc, answers = understanding_accuracy(loaded, test_images, digits.target[test])
    judge = fit_judge(np.stack([render(digits.images[i], size) for i in train]), digits.target[train])
    judge_acc = float(np.mean(judge.predict(classifier_features(test_images)) == digits.target[test]))
    # The codebook's own ceiling: the held-out digits coded and decoded, as the judge reads them.
    round_trip = codebook.decode(codebook.encode(test_images))
    codebook_acc = float(np.mean(judge.predict(classifier_features(round_trip)) == digits.target[test]))
    gen_acc, images = generation_eval(loaded, codebook, judge, settings=cfg.eval_sampling, columns=cfg.eval_columns)
    save_grid(grid_path, images, cfg.eval_columns,
              f"OmniMamba {title}: understanding {100 * und_acc:.1f}%, generation " +
              ", ".join(f"{k} {100 * a:.0f}%" for k, a in gen_acc.items()), label=str)
    return {"understanding_accuracy": und_acc, "understanding_examples": len(test), "sample_answers": answers[:10],
            "generation_accuracy": gen_acc,
            "generation_settings": {label: {"temperature": t, "top_k": k, "cfg": w}
                                    for label, t, k, w in cfg.eval_sampling},
            "generation_images_per_digit": cfg.eval_columns,
            "judge_accuracy_on_real_test_digits": judge_acc,
            "judge_accuracy_on_codebook_round_trip": codebook_acc,
            "samples": str(grid_path), "seconds": time.perf_counter() - start}


def finish_checkpoint(checkpoint_root: Path, tokenizer_dir: Path, codebook: Path):
    """The tokenizer/processor files and the codebook beside the checkpoint (`inference.load.load_omnimamba` reads
    the former; generated codes decode with the latter)."""
    from janusflow_jax.data.omnimamba_processor import PROCESSOR_CONFIG
    from janusflow_jax.inference.load import INFERENCE_FILES, copy_inference_files

    copy_inference_files(tokenizer_dir, checkpoint_root, (*INFERENCE_FILES, PROCESSOR_CONFIG))
    shutil.copyfile(codebook, checkpoint_root / CODEBOOK)


# --------------------------------------------------------------------------------------------------------- the run
def run(config, workdir, progress: bool = True) -> dict:
    """The whole pipeline in `workdir` (resumable); returns eval.json's content."""
    from janusflow_jax.data import prepare
    from janusflow_jax.models.omnimamba import OmniMambaSystemConfig
    from janusflow_jax.train import recipe

    workdir = local_workdir(workdir)
    data_root = workdir / "data"
    data_root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    system = OmniMambaSystemConfig.from_dict(config.model.to_dict())
    split = write_dataset(data_root, system.vision.image_size, config.digits)
    tokenizer = write_tokenizer(data_root / "tokenizer", system.lm.caption_length, config.data.pad_id)
    summary = prepare.run(prepare_config(config, data_root, tokenizer), progress=progress)
    print(f"data: {len(split['train'])} training / {len(split['test'])} held-out digits; "
          f"{prepare.summary_line(summary)}")
    codebook = Path(summary["image_tokenizer"]["path"])
    stage_seconds = {}

    eval_path = workdir / "eval.json"
    results = json.loads(eval_path.read_text()) if eval_path.is_file() else {}

    trained_earlier = {name for name in recipe.stage_names(config)
                       if recipe.finished(workdir / name, config.recipe[name].steps)}

    def after_stage(name: str, stage_dir: Path):
        if name not in trained_earlier:
            stage_seconds[name] = time.perf_counter() - stage_start[0]
        root = Path(stage_dir) / "checkpoints"
        finish_checkpoint(root, tokenizer, codebook)
        if name not in results and name in config.digits.eval_stages:
            print(f"evaluating {name} ...")
            results[name] = evaluate(root, split, config.digits, title=name, grid_path=workdir / f"samples_{name}.png")
            r = results[name]
            print(f"{name}: held-out understanding accuracy {100 * r['understanding_accuracy']:.1f}% on "
                  f"{r['understanding_examples']} digits; generated digits recognised: " +
                  ", ".join(f"{k} {100 * a:.1f}%" for k, a in r["generation_accuracy"].items()))
            _write_atomic(eval_path, json.dumps(results, indent=1) + "\n")
        stage_start[0] = time.perf_counter()

    stage_start = [time.perf_counter()]
    stage_dirs = recipe.run_stages(config, workdir, data_dir=str(data_root / "prepared"), progress=progress,
                                   after_stage=after_stage)
    results["stage_seconds_this_invocation"] = stage_seconds  # training of each stage trained by this command
    results["wall_seconds_this_invocation"] = time.perf_counter() - t0
    _write_atomic(eval_path, json.dumps(results, indent=1) + "\n")
    print(f"done in {results['wall_seconds_this_invocation']:.0f} s. Data {data_root}; stages " +
          ", ".join(str(d) for d in stage_dirs) + f" (checkpoints, metrics.jsonl, loss_curve.png each); "
          f"evaluation {eval_path}; sample grids {workdir}/samples_stage*.png.")
    return results
