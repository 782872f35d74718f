"""Evaluation: the paper's benchmarks (`launch.evaluate`) and the evaluators that run inside training.

Phase A (the JAX model answers and draws; resumable, split over hosts):
  prompts          how each understanding benchmark is asked (DeepSeek's protocol as VLMEvalKit's Janus wrapper)
  answering        `und`: a benchmark file -> predictions JSONL, batches with a different image per row
  generation       `gen`: a prompt file -> the images in the layout the official scorer reads, with a manifest
  resume           host shares, whole-file writes, the manifest that pins an output directory's settings

Evaluators inside training (`config.eval`, every `eval_every` steps on the EMA weights):
  evaluators       the registry the config names and the runner the training loop calls
  losses           held-out AR / rectified-flow / REPA losses on fixed batches, fixed t grid, fixed noise
  samples          a sample grid for fixed prompts and seeds
  understanding    a small benchmark file answered and scored by the rules below

Phase B, offline scoring: pure Python + numpy, no model, no network.

  paper            the JanusFlow paper's numbers (Tables 2-5) and a markdown table of a checkpoint's beside them
  formats          reading VLMEvalKit TSVs, CSV/JSON(L) benchmark files and predictions JSONL; one-line input errors
  vqa              VQAv2 (VQA API vqaEval.py) and TextVQA (m4c_evaluator) accuracy, GQA exact match
  pope             POPE yes/no parsing, F1/accuracy/precision/recall/yes-ratio per subset
  mme              MME acc and acc+ per subtask, perception and cognition sums (calculation.py)
  multiple_choice  VLMEvalKit option extraction, accuracy per category, circular evaluation (MMBench, SEED)
  mmmu             MMMU's response parsers (seeded random fallback) and accuracy per subject
  geneval          GenEval's clause logic on detections and its summary_scores aggregation
  dpg              DPG-Bench's parent-zeroed per-prompt scores and category scores (compute_dpg_bench.py)
  fid              the Fréchet distance of two Gaussians (pytorch-fid / clean-fid)
  score            the suite registry SUITES and score_files, what the CLI calls
"""
