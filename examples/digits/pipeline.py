"""The digits run: real data through the whole training path on a laptop CPU, and an evaluation a user can read.

Pipeline (`run`; every step skips work already done, so rerunning the command resumes):
  1. data     scikit-learn's 1,797 handwritten 8 x 8 digits, rendered as dark ink on white paper at `image_size` px
              (bicubic upscaling) into <workdir>/data/images/*.png, split once into train / held-out test (20%); the
              training split becomes three JSON-lines manifests: understanding ("What digit is this?" -> "seven"),
              generation ("a handwritten seven" -> image) and text-only (short true sentences about digits).
  2. tokens   a word-level tokenizer over exactly those words (`processor.make_tokenizer`) + processor files with the
              model's image geometry and no system prompt, in <workdir>/data/tokenizer.
  3. prepare  `prepare.run` (the `launch.prepare_data` job) -> ArrayRecord shards in <workdir>/data/prepared, latent
              space `space_to_depth`.
  4. stages   stage 1 -> 2 -> 3 with `trainer.train` in <workdir>/stage{1,2,3}, each initialised from the previous
              stage's EMA checkpoint (`recipe.run_stages`).
  5. eval     after each stage: held-out understanding accuracy and classifier-judged generation accuracy per CFG
              weight, a sample grid (rows = prompted digits 0-9); all in <workdir>/eval.json and
              <workdir>/samples_stage{N}.png. The final checkpoint root gets the tokenizer/processor files and
              latent.json, so `launch.generate` / `launch.chat --checkpoint=<workdir>/stage3/checkpoints` work.
The held-out set is also written as benchmark files (`write_eval_sets`, <workdir>/data/eval/): digits_und.tsv in
VLMEvalKit's format (base64 images, the digit's name as the short answer) and digits_gen.jsonl in GenEval's metadata
format, so `launch.evaluate und --suite=digits` / `gen --suite=geneval` evaluate any checkpoint of the run as they
would the release; the understanding accuracy here is computed by the same code (`eval.answering`), so the two
agree exactly.

The generation judge is a LogisticRegression on the training split's digits, rendered and read back through the same
pixel round trip as generated images (`classifier_features`: block-average to 8 x 8, ink level 0-16), so it sees
generated and real digits alike.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from janusflow_jax import paths
from janusflow_jax.inference.load import LATENT_FILE  # latent.json: the checkpoint root's latent space

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
QUESTION = "What digit is this?"
GEN_PROMPT = "a handwritten {name}"
CAPTIONS = ("a handwritten {name}", "the digit {name}")


# ------------------------------------------------------------------------------------------------------------ data
def render(digit: np.ndarray, image_size: int) -> np.ndarray:
    """One sklearn digit (ink levels 0-16, [8, 8]) -> uint8 RGB [image_size, image_size, 3], dark ink on white."""
    from PIL import Image

    gray = np.round(255.0 * (1.0 - np.asarray(digit, np.float64) / 16.0)).astype(np.uint8)
    big = Image.fromarray(gray, "L").resize((image_size, image_size), Image.BICUBIC)
    return np.repeat(np.asarray(big, np.uint8)[..., None], 3, axis=-1)


def classifier_features(images: np.ndarray) -> np.ndarray:
    """uint8 [n, S, S, 3] renders -> float [n, 64] ink levels 0-16 on the 8 x 8 grid (block average)."""
    images = np.asarray(images, np.float64)
    n, s = images.shape[:2]
    gray = images.mean(axis=-1).reshape(n, 8, s // 8, 8, s // 8).mean(axis=(2, 4))
    return (16.0 * (1.0 - gray / 255.0)).reshape(n, 64)


def text_sentences() -> list[str]:
    """Short true sentences about the digits (the text-only data)."""
    out = []
    for a in range(10):
        out.append(f"{NAMES[a]} is {'an even' if a % 2 == 0 else 'an odd'} number.")
        # "word: answer" lines: with a word-level tokenizer the space after "Assistant:" is its own token, which the
        # understanding data never trains (it is prompt, not response); these sentences teach ": " -> " ".
        out.append(f"{NAMES[a]}: {'even' if a % 2 == 0 else 'odd'}.")
        if a < 9:
            out.append(f"after {NAMES[a]}: {NAMES[a + 1]}.")
        if a < 9:
            out.append(f"{NAMES[a + 1]} comes after {NAMES[a]}.")
            out.append(f"{NAMES[a]} comes before {NAMES[a + 1]}.")
        for b in range(10 - a):
            out.append(f"{NAMES[a]} plus {NAMES[b]} is {NAMES[a + b]}.")
    return out


def vocabulary() -> list[str]:
    """Every word the manifests, prompts and answers use (the tokenizer's vocabulary)."""
    texts = [QUESTION, *text_sentences()] + [c.format(name=n) for c in CAPTIONS for n in NAMES]
    return sorted({word for text in texts for word in text.replace(".", " ").replace("?", " ").split()})


def split_indices(n: int, test_fraction: float, seed: int, max_examples: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices into the n digits: a seeded shuffle, the first `test_fraction` held out."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"digits.test_fraction must lie in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    if max_examples:
        order = order[:max_examples]
    n_test = max(1, int(round(test_fraction * len(order))))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def _write_atomic(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_dataset(root: Path, image_size: int, cfg) -> dict:
    """PNGs, manifests and split.json under `root`; skipped when split.json (written last) exists. Returns the split."""
    from PIL import Image
    from sklearn.datasets import load_digits

    done = root / "split.json"
    if done.is_file():
        return json.loads(done.read_text())
    digits = load_digits()
    train, test = split_indices(len(digits.target), cfg.test_fraction, cfg.split_seed, cfg.max_examples)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in np.concatenate([train, test]):
        Image.fromarray(render(digits.images[i], image_size)).save(root / "images" / f"{i:04d}.png")
    gen, und = [], []
    for i in train:
        name, image = NAMES[digits.target[i]], f"images/{i:04d}.png"
        gen.append({"image": image, "caption": [c.format(name=name) for c in CAPTIONS]})
        und.append({"image": image, "question": QUESTION, "answer": name})
    text = [{"text": t} for t in text_sentences()]
    for kind, rows in (("gen", gen), ("und", und), ("text", text)):
        _write_atomic(root / f"{kind}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    split = {"train": train.tolist(), "test": test.tolist(), "image_size": image_size}
    _write_atomic(done, json.dumps(split))
    return split


def write_tokenizer(out: Path, model_cfg) -> Path:
    """Word-level tokenizer + processor files (the model's image geometry, no system prompt) in `out`."""
    from janusflow_jax.data.processor import Processor, make_tokenizer

    if (out / "processor_config.json").is_file():
        return out
    make_tokenizer(out, vocabulary())
    processor = Processor.from_pretrained(out, num_image_tokens=model_cfg.und_encoder.num_patches,
                                          image_size=model_cfg.und_encoder.image_size)
    processor.system_prompt = ""  # short rows: the official system prompt would be most of every example
    processor.save_pretrained(out)
    return out


def prepare_config(config, data_root: Path, tokenizer: Path):
    """The `launch.prepare_data` job config for the digits manifests and this run's model."""
    import ml_collections

    from configs.prepare_data import prepare_config as job_fields

    job = ml_collections.ConfigDict()
    job.model = config.model
    job.prepare = job_fields(out=str(data_root / "prepared"), tokenizer=str(tokenizer),
                             gen_jsonl=str(data_root / "gen.jsonl"), und_jsonl=str(data_root / "und.jsonl"),
                             text_jsonl=str(data_root / "text.jsonl"), seq_len=config.data.seq_len,
                             prompt_len=config.data.prompt_len, sft_fraction=1.0, system_prompt="",
                             records_per_shard=config.digits.records_per_shard, num_threads=2,
                             encode_batch_per_device=32)
    job.prepare.latent.kind = "space_to_depth"
    return job


def write_eval_sets(data_root: Path, split: dict, image_size: int, cfg) -> dict[str, Path]:
    """The held-out digits as benchmark files in <data_root>/eval/ (skipped when written):
      digits_und.tsv    VLMEvalKit's TSV: index (the sklearn index), question, answer (the digit's name), category,
                        image (base64 PNG of the render the model sees), for the digits `eval_understanding` scores
                        (the first `eval_max_test` held-out digits when set)
      digits_gen.jsonl  GenEval's metadata format: one line per digit 0-9, {"tag": "digit", "include": [{"class":
                        name, "count": 1}], "prompt": "a handwritten <name>", "digit": k}"""
    import base64
    import io

    from PIL import Image
    from sklearn.datasets import load_digits

    out = data_root / "eval"
    files = {"und": out / "digits_und.tsv", "gen": out / "digits_gen.jsonl"}
    if all(f.is_file() for f in files.values()):
        return files
    out.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    test = np.asarray(split["test"])
    if cfg.eval_max_test:
        test = test[:cfg.eval_max_test]
    lines = ["index\tquestion\tanswer\tcategory\timage"]
    for i in test:
        buffer = io.BytesIO()
        Image.fromarray(render(digits.images[i], image_size)).save(buffer, format="PNG")
        name = NAMES[digits.target[i]]
        lines.append(f"{i}\t{QUESTION}\t{name}\t{name}\t{base64.b64encode(buffer.getvalue()).decode()}")
    _write_atomic(files["und"], "\n".join(lines) + "\n")
    _write_atomic(files["gen"], "".join(json.dumps({"tag": "digit", "include": [{"class": name, "count": 1}],
                                                    "prompt": GEN_PROMPT.format(name=name), "digit": k}) + "\n"
                                        for k, name in enumerate(NAMES)))
    return files


def judge_generated(images_dir: Path, judge) -> float:
    """Share of the images `launch.evaluate gen --suite=geneval --data=digits_gen.jsonl` wrote (images_dir =
    its OUT/images) that the judge reads as the prompted digit."""
    from PIL import Image

    hits = []
    for folder in sorted(p for p in Path(images_dir).iterdir() if p.name.isdigit()):
        digit = json.loads((folder / "metadata.jsonl").read_text())["digit"]
        for path in sorted((folder / "samples").glob("*.png")):
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))[None]
            hits.append(int(judge.predict(classifier_features(pixels))[0]) == digit)
    return float(np.mean(hits))


# ------------------------------------------------------------------------------------------------------ evaluation
def eval_understanding(model, params, processor, und_file: Path) -> tuple[float, list[str]]:
    """Held-out understanding accuracy as `launch.evaluate und --suite=digits` + `score --suite=digits` compute it on
    digits_und.tsv (the same code: greedy, 4 new tokens, batches of 8, no system prompt)."""
    from janusflow_jax.eval import answering, formats, prompts, score

    protocol = prompts.PROTOCOLS["digits"]
    items = answering.read_items(protocol, und_file, processor.image_tag)
    answers = answering.answer_items(model, params, processor, items, system_prompt=protocol.system_prompt,
                                     max_new_tokens=protocol.max_new_tokens)
    records = [{"index": it.index, "prediction": a} for it, a in zip(items, answers)]
    return score.score_digits_suite(formats.read_rows(und_file), records)["score"] / 100, answers


def understanding_accuracy(model, params, processor, images: np.ndarray, labels: np.ndarray,
                           batch_size: int = 64, suffix: str = "") -> tuple[float, list[str]]:
    """Greedy chat answers to QUESTION for uint8 images [n, S, S, 3]; accuracy of answer == the digit's name.
    `suffix`: text appended to the chat prompt (" ": the separator the training rows have after "Assistant:")."""
    from janusflow_jax.inference.chat import generate_tokens
    from janusflow_jax.inference.sampler import left_pad

    prompt = dict(processor.chat_prompt(QUESTION, num_images=1))
    if suffix:
        extra = np.asarray(processor.tokenizer(suffix, add_special_tokens=False)["input_ids"], np.int32)
        prompt["input_ids"] = np.concatenate([prompt["input_ids"], extra])
        prompt["image_token_mask"] = np.concatenate([prompt["image_token_mask"], np.zeros(len(extra), np.int32)])
    pixels = np.asarray(processor.preprocess_understanding(list(images)), np.float32)  # [n, S, S, 3]
    answers = []
    for start in range(0, len(images), batch_size):
        rows = np.arange(start, start + batch_size) % len(images)  # same shape every batch: one compile
        ids, mask = left_pad([prompt["input_ids"]] * len(rows), processor.pad_id)
        image_mask, _ = left_pad([prompt["image_token_mask"]] * len(rows), 0)
        tokens, lengths = generate_tokens(model, params, ids, mask, pixels[rows][:, None], image_mask,
                                          eos_id=processor.eos_id, max_new_tokens=4)
        answers += [processor.decode(t[:n]) for t, n in zip(tokens, lengths)]
    answers = answers[:len(images)]
    correct = [a.strip().lower().rstrip(".") == NAMES[y] for a, y in zip(answers, labels)]
    return float(np.mean(correct)), answers


def fit_judge(train_images: np.ndarray, train_labels: np.ndarray):
    """The generation judge: LogisticRegression on the training split's rendered digits."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=5000).fit(classifier_features(train_images), train_labels)


def generation_eval(model, params, processor, space, judge, *, cfg_weights: Sequence[float], columns: int,
                    steps: int, seed: int = 0) -> tuple[dict, dict]:
    """Images for "a handwritten <digit>" (digits 0-9, `columns` each) at each CFG weight, judged by `judge`.
    Returns ({cfg: accuracy}, {cfg: uint8 images [10 * columns, S, S, 3], digit-major})."""
    from janusflow_jax.inference.sampler import generate_images

    prompts = [GEN_PROMPT.format(name=n) for n in NAMES]
    wanted = np.repeat(np.arange(10), columns)
    accuracy, images = {}, {}
    for w in cfg_weights:
        out = generate_images(model, params, processor, space, None, prompts, cfg=float(w), steps=steps, seed=seed,
                              images_per_prompt=columns, batch_size=10 * columns)
        accuracy[float(w)] = float(np.mean(judge.predict(classifier_features(out)) == wanted))
        images[float(w)] = out
    return accuracy, images


def save_grid(path: Path, images: dict, columns: int, title: str, label=lambda w: f"CFG w = {w:g}"):
    """One PNG: for each CFG weight (each key of `images`, titled `label(key)`) a block of 10 rows (prompted digit
    0-9) x `columns` samples, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = list(images)
    fig, axes = plt.subplots(1, len(weights), figsize=(1.1 * columns * len(weights) + 1, 11), squeeze=False)
    for ax, w in zip(axes[0], weights):
        # A grey 1-px frame per sample: white-paper digits tiled edge to edge would run into each other.
        x = np.pad(images[w], ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=160)
        s = x.shape[1]
        grid = x.reshape(10, columns, s, s, 3).transpose(0, 2, 1, 3, 4).reshape(10 * s, columns * s, 3)
        ax.imshow(grid, interpolation="nearest")
        ax.set_title(label(w))
        ax.set_yticks([s * (k + 0.5) for k in range(10)], [f'"{GEN_PROMPT.format(name=n)}"' for n in NAMES])
        ax.set_xticks([])
    fig.suptitle(title)
    fig.tight_layout()
    paths.save_figure(fig, path, dpi=80)
    plt.close(fig)


def evaluate(checkpoint_root: Path, processor_dir: Path, split: dict, cfg, *, title: str, grid_path: Path,
             und_file: Path) -> dict:
    """Understanding + generation accuracy of the EMA weights in `checkpoint_root`; writes the sample grid.
    `und_file`: the held-out understanding set (`write_eval_sets`), the test digits evaluated."""
    from sklearn.datasets import load_digits

    from janusflow_jax import checkpoint as checkpoint_lib
    from janusflow_jax.data import latents
    from janusflow_jax.inference.load import load_processor
    from janusflow_jax.models.janusflow import JanusFlow

    start = time.perf_counter()
    model_cfg, params = checkpoint_lib.load_params(checkpoint_root)
    model = JanusFlow(model_cfg)
    processor = load_processor(processor_dir, model_cfg)
    digits = load_digits()
    size = model_cfg.und_encoder.image_size
    train, test = np.asarray(split["train"]), np.asarray(split["test"])
    if cfg.eval_max_test:
        test = test[:cfg.eval_max_test]
    test_images = np.stack([render(digits.images[i], size) for i in test])
    und_acc, answers = eval_understanding(model, params, processor, und_file)
    und_acc_space, _ = understanding_accuracy(model, params, processor, test_images, digits.target[test], suffix=" ")
    judge = fit_judge(np.stack([render(digits.images[i], size) for i in train]), digits.target[train])
    judge_acc = float(np.mean(judge.predict(classifier_features(test_images)) == digits.target[test]))
    space = latents.make_latent_space("space_to_depth", image_size=size, latent_size=model_cfg.latent_size)
    gen_acc, images = generation_eval(model, params, processor, space, judge, cfg_weights=cfg.eval_cfg,
                                      columns=cfg.eval_columns, steps=cfg.eval_steps)
    best = max(gen_acc, key=gen_acc.get)
    save_grid(grid_path, images, cfg.eval_columns,
              f"{title}: understanding {100 * und_acc:.1f}%, generation " +
              ", ".join(f"w={w:g} {100 * a:.0f}%" for w, a in gen_acc.items()))
    return {"understanding_accuracy": und_acc, "understanding_accuracy_prompt_ending_in_space": und_acc_space,
            "understanding_examples": len(test),
            "sample_answers": answers[:10], "generation_accuracy": {f"{w:g}": a for w, a in gen_acc.items()},
            "best_cfg": best, "generation_images_per_digit": cfg.eval_columns, "sampler_steps": cfg.eval_steps,
            "judge_accuracy_on_real_test_digits": judge_acc, "samples": str(grid_path),
            "seconds": time.perf_counter() - start}


def finish_checkpoint(checkpoint_root: Path, tokenizer_dir: Path, space_description: dict):
    """Makes a training checkpoint root self-sufficient for launch.generate / launch.chat: the tokenizer and
    processor files, and latent.json (the latent space that `inference.load` rebuilds as the decoder)."""
    from janusflow_jax.inference.load import copy_inference_files

    copy_inference_files(tokenizer_dir, checkpoint_root)
    _write_atomic(checkpoint_root / LATENT_FILE, json.dumps(space_description, indent=1) + "\n")


# --------------------------------------------------------------------------------------------------------- the run
def local_workdir(workdir) -> Path:
    """The digits runs render, judge and read their images as local files: a gs:// workdir is refused in one line
    (rather than written under ./gs:/ on this machine)."""
    if paths.is_remote(workdir):
        raise ValueError(f"the digits example runs in a local workdir (its images are made, judged and read as local "
                         f"files), not {workdir}: use a local --workdir")
    return Path(workdir)


def run(config, workdir, progress: bool = True) -> dict:
    """The whole pipeline in `workdir` (resumable); returns eval.json's content."""
    from janusflow_jax.data import prepare
    from janusflow_jax.train import recipe
    from janusflow_jax.models.config import JanusFlowConfig

    workdir = local_workdir(workdir)
    data_root = workdir / "data"
    data_root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_cfg = JanusFlowConfig.from_dict(config.model.to_dict())
    split = write_dataset(data_root, model_cfg.und_encoder.image_size, config.digits)
    tokenizer = write_tokenizer(data_root / "tokenizer", model_cfg)
    eval_sets = write_eval_sets(data_root, split, model_cfg.und_encoder.image_size, config.digits)
    if "eval" in config and not config.eval.und_data:  # the in-training understanding evaluator's set
        config.eval.und_data = str(eval_sets["und"])
    summary = prepare.run(prepare_config(config, data_root, tokenizer), progress=progress)
    print(f"data: {len(split['train'])} training / {len(split['test'])} held-out digits; "
          f"{prepare.summary_line(summary)}")
    space_description = summary["latent"]  # the prepared data's latent space (latents.describe() + extras)

    eval_path = workdir / "eval.json"
    results = json.loads(eval_path.read_text()) if eval_path.is_file() else {}

    def after_stage(name: str, stage_dir: Path):
        root = stage_dir / "checkpoints"
        finish_checkpoint(root, tokenizer, space_description)
        if name in results or name not in config.digits.eval_stages:
            return
        print(f"evaluating {name} ...")
        results[name] = evaluate(root, tokenizer, split, config.digits, title=name,
                                 grid_path=workdir / f"samples_{name}.png", und_file=eval_sets["und"])
        r = results[name]
        print(f"{name}: held-out understanding accuracy {100 * r['understanding_accuracy']:.1f}% "
              f"({100 * r['understanding_accuracy_prompt_ending_in_space']:.1f}% with the prompt ending in "
              f"\"Assistant: \") on {r['understanding_examples']} digits; generated digits recognised: " +
              ", ".join(f"CFG {w} {100 * a:.1f}%" for w, a in r["generation_accuracy"].items()))
        _write_atomic(eval_path, json.dumps(results, indent=1) + "\n")

    stage_dirs = recipe.run_stages(config, workdir, data_dir=str(data_root / "prepared"), progress=progress,
                                   after_stage=after_stage)
    results["wall_seconds_this_invocation"] = time.perf_counter() - t0
    _write_atomic(eval_path, json.dumps(results, indent=1) + "\n")
    final = stage_dirs[-1] / "checkpoints"
    print(f"done in {results['wall_seconds_this_invocation']:.0f} s. Data {data_root}; stages " +
          ", ".join(str(d) for d in stage_dirs) + f" (checkpoints, metrics.jsonl, loss_curve.png each); "
          f"evaluation {eval_path}; sample grids {workdir}/samples_stage*.png.\n"
          f"Try: python -m launch.generate --checkpoint={final} --prompt=\"a handwritten seven\" --out={workdir}/gen\n"
          f"     python -m launch.chat --checkpoint={final} --image={data_root}/images/{split['test'][0]:04d}.png "
          f"--question=\"{QUESTION}\"\n"
          f"     python -m launch.evaluate und --suite=digits --checkpoint={final} --data={eval_sets['und']} "
          f"--out={workdir}/evaluate/und")
    return results
