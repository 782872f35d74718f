"""The understanding evaluator: a small benchmark file answered by the EMA weights and scored by the offline rules,
as `launch.evaluate und` + `score` would do with a checkpoint.

`eval.und_data` (a file `launch.evaluate und` reads, e.g. the digits run's data/eval/digits_und.tsv), asked with the
protocol of `eval.und_suite` (prompts.py), at most `eval.und_limit` questions (0: all), `eval.und_batch_size` rows a
batch, scored by the suite's scorer (score.SUITES); reported as `eval/und_<suite>` on the paper's scale. The
tokenizer is `eval.tokenizer`, else the one the held-out (or training) data was prepared with.

On one host the questions are answered with the run's (mesh-sharded) weights. On several, each host answers its
share (every process_count-th question, `resume.host_share`, as `launch.evaluate und`) on one of its own devices,
with the weights gathered to every host (`process_allgather`, outside the run's global mesh: the answering program is
host-local); the answers are gathered, process 0 scores them, and the scalars are its own (the others report none).
Each question is answered with the same shapes whichever host and batch it falls in, so the score equals one host's.
`last_records` holds the latest {"index", "prediction"} records (on process 0 every question's).
"""

from __future__ import annotations

import json

import jax
import numpy as np

from janusflow_jax.train.plan import TrainingError


def allgather_texts(text: str) -> list[str]:
    """Every process's `text`, in process order (a collective: every process calls it)."""
    from jax.experimental import multihost_utils

    data = np.frombuffer(text.encode("utf-8"), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32))).reshape(-1)
    padded = np.zeros(max(1, int(lengths.max())), np.uint8)
    padded[:data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [bytes(gathered[i, :lengths[i]]).decode("utf-8") for i in range(len(lengths))]


class UnderstandingSet:
    """`eval.evaluators` name: "understanding"."""

    name = "understanding"

    def __init__(self, plan):
        from janusflow_jax.data import loader
        from janusflow_jax.eval import answering, formats, prompts, score
        from janusflow_jax.inference.load import load_processor

        ev = plan.config.eval
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

    def _answer(self, params, items) -> list[str]:
        from janusflow_jax.eval import answering

        return answering.answer_items(self.plan.model, params, self.processor, items,
                                      system_prompt=self.protocol.system_prompt,
                                      max_new_tokens=self.protocol.max_new_tokens, batch_size=self.batch_size,
                                      pad_to=self.pad_to)

    def _answer_on_hosts(self, params) -> dict[int, str]:
        """{position: answer} of every question: this host's share answered here, the others' gathered."""
        from jax.experimental import multihost_utils
        from jax.sharding import Mesh

        from janusflow_jax.eval import resume
        from janusflow_jax.sharding import mesh_context

        gathered = multihost_utils.process_allgather(params, tiled=True)  # the global weights as numpy, every host
        device = jax.local_devices()[0]
        names = self.plan.mesh.axis_names
        share = [self.items[p] for p in resume.host_share(len(self.items), jax.process_index(), jax.process_count())]
        with mesh_context(Mesh(np.array([device]).reshape((1,) * len(names)), names)):
            answers = self._answer(jax.device_put(gathered, device), share)
        mine = json.dumps({it.position: a for it, a in zip(share, answers)})
        return {int(p): a for text in allgather_texts(mine) for p, a in json.loads(text).items()}

    def __call__(self, step: int, params) -> dict:
        if jax.process_count() == 1:
            answers = dict(enumerate(self._answer(params, self.items)))
        else:
            answers = self._answer_on_hosts(params)
        self.last_records = [{"index": it.index, "prediction": answers[it.position]} for it in self.items]
        if jax.process_index() != 0:
            return {"scalars": {}}
        return {"scalars": {f"und_{self.suite}": float(self.score(self.rows, self.last_records)["score"])}}
