"""The understanding evaluator: a small benchmark file answered by the EMA weights and scored by the offline rules,
as `launch.evaluate und` + `score` would do with a checkpoint.

`eval.und_data` (a file `launch.evaluate und` reads, e.g. the digits run's data/eval/digits_und.tsv), asked with the
protocol of `eval.und_suite` (prompts.py), at most `eval.und_limit` questions (0: all), `eval.und_batch_size` rows a
batch, scored by the suite's scorer (score.SUITES); reported as `eval/und_<suite>` on the paper's scale. The
tokenizer is `eval.tokenizer`, else the one the held-out (or training) data was prepared with.

One host only: answers are decoded on this host's devices and read back (`chat.generate_tokens`); on several hosts
evaluate a checkpoint with `launch.evaluate und` instead.
"""

from __future__ import annotations

import jax

from janusflow_jax.train.plan import TrainingError


class UnderstandingSet:
    """`eval.evaluators` name: "understanding"."""

    name = "understanding"

    def __init__(self, plan):
        from janusflow_jax.data import loader
        from janusflow_jax.eval import answering, formats, prompts, score
        from janusflow_jax.inference.load import load_processor

        ev = plan.config.eval
        if jax.process_count() > 1:
            raise TrainingError("the understanding evaluator runs on one host; on several, evaluate a checkpoint "
                                "with launch.evaluate und")
        if not ev.und_data:
            raise TrainingError("the understanding evaluator needs eval.und_data (a benchmark file)")
        if ev.und_suite not in prompts.PROTOCOLS or not prompts.PROTOCOLS[ev.und_suite].scorer:
            raise TrainingError(f"eval.und_suite must be a suite scored here ({', '.join(prompts.PROTOCOLS)} but "
                                f"mmvet), got {ev.und_suite!r}")
        self.plan, self.suite = plan, ev.und_suite
        self.protocol = prompts.PROTOCOLS[ev.und_suite]
        data_dir = ev.data_dir or (plan.config.data.dir if plan.config.data.source == "prepared" else "")
        tokenizer = ev.tokenizer or (loader.load_metadata(data_dir)["tokenizer"]["path"] if data_dir else "")
        if not tokenizer:
            raise TrainingError("the understanding evaluator needs a tokenizer: set eval.tokenizer")
        try:
            self.processor = load_processor(tokenizer, plan.model_cfg)
            self.items = answering.read_items(self.protocol, ev.und_data, self.processor.image_tag,
                                              limit=int(ev.und_limit))
            self.rows = self.protocol.select(formats.read_rows(ev.und_data))[:len(self.items)]
        except (ValueError, OSError) as e:
            raise TrainingError(f"the understanding evaluator: {e}") from None
        self.pad_to = answering.prompt_length(self.processor, self.items, self.protocol.system_prompt)
        self.batch_size = int(ev.und_batch_size)
        self.score = score.SUITES[self.protocol.scorer]

    def __call__(self, step: int, params) -> dict:
        from janusflow_jax.eval import answering

        answers = answering.answer_items(self.plan.model, params, self.processor, self.items,
                                         system_prompt=self.protocol.system_prompt,
                                         max_new_tokens=self.protocol.max_new_tokens, batch_size=self.batch_size,
                                         pad_to=self.pad_to)
        records = [{"index": it.index, "prediction": a} for it, a in zip(self.items, answers)]
        return {"scalars": {f"und_{self.suite}": float(self.score(self.rows, records)["score"])}}
