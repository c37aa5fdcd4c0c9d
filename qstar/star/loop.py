"""The STaR loop (Zelikman et al., 2022): sample rationales, keep the correct ones, rationalize the
rest with the answer as a hint, fine-tune, repeat; resumable after a crash at any point.

Iteration ``n`` (1, 2, ...), with ``M_0`` the starting model:

1. **rationale**: ``M_{n-1}`` samples ``k`` completions per training problem (few-shot prompted when
   it is the starting model, zero-shot after fine-tuning); a finished completion whose answer is
   correct is kept;
2. **rationalization**: for every problem without a kept rationale, the few-shot prompt with the
   correct answer as a hint after each question (:data:`~qstar.star.tasks.HINT`); a correct
   completion is kept *without* the hint: the training example is the plain question and the
   completion (one that mentions the hint is dropped);
3. **fine-tune** (:mod:`qstar.star.finetune`): ``M_n`` is the starting model (or, with
   ``restart=False``, ``M_{n-1}``) trained on the kept examples, deduplicated, for
   ``steps * (1 + step_growth) ** (n - 1)`` steps, by the trainer into ``iteration-<n>/train``
   (its checkpoint is the iteration's);
4. **evaluate**: ``M_n`` on the held-out problems, greedy and majority of ``majority_samples``.

Iteration 0 evaluates ``M_0`` alone: the few-shot baseline. ``method="direct"`` is the other
baseline: one fine-tune on the gold answers alone (no rationale), same prompts, same evaluation.

What is written under ``output_dir``: ``config.json``, ``state.json`` (the phases done; replaced
atomically), ``iteration-<n>/samples.jsonl`` (every sample, kept or not, with its question, phase,
iteration and correctness; appended durably one batch at a time), ``iteration-<n>/examples.jsonl``
(the kept examples), ``iteration-<n>/train/`` (the trainer's run) and the report
(:mod:`qstar.star.report`). ``resume=True`` continues where a run stopped: done phases are skipped,
a sampling phase continues after its last complete batch (each batch has its own seed, so the
samples are those of an uninterrupted run), a fine-tune resumes from its latest checkpoint.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig, TrainingConfig, get_preset
from ..durable import append_durably, write_atomic
from ..run_dir import OutputDirError, RunDirLock
from .config import StarConfig
from .finetune import StarObjective, steps_for_iteration
from .report import write_report
from .sampling import majority, sample_batches
from .tasks import HINT_MARKER, Problem, Task, make_task

log = logging.getLogger("qstar.star")

__all__ = ["StarConfig", "StarResult", "run_star"]

STATE_VERSION = 1


@dataclass
class StarResult:
    output_dir: Path
    rows: list[dict]


# --------------------------------------------------------------------------------------------------
# Files of the output directory
# --------------------------------------------------------------------------------------------------


def _it(out: Path, n: int) -> Path:
    return out / f"iteration-{n}"


def _read_samples(path: Path) -> list[dict]:
    """The records of complete batches of a samples file. A batch cut short by a crash (a torn
    last line, or fewer records than its rows) is removed from the file, which is rewritten
    atomically without it."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    records, torn = [], False
    for line in text.split("\n"):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            torn = True  # only the last write can be cut short
    counts: dict[tuple, int] = {}
    for r in records:
        counts[(r["phase"], r["batch"])] = counts.get((r["phase"], r["batch"]), 0) + 1
    good = [r for r in records if counts[(r["phase"], r["batch"])] == r["batch_rows"]]
    if torn or len(good) != len(records):
        log.warning("%s: dropping %d records of an unfinished batch", path, len(records) - len(good))
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in good))
    return good


class _Run:
    """One STaR run: the config, the task, the output directory and its state."""

    def __init__(self, config: StarConfig, task: Task):
        self.c, self.task = config, task
        self.out = Path(config.output_dir)
        self.state_path = self.out / "state.json"
        self.state = {"version": STATE_VERSION, "iterations": {}}
        self.by_id = {p.id: p for p in task.train}  # the training examples' problems
        self._model = None  # (n, M_n): the last model loaded

    # --- state -------------------------------------------------------------------------------

    def prepare(self) -> None:
        c, out = self.c, self.out
        saved_config = out / "config.json"
        if c.resume:
            if not self.state_path.is_file():
                raise ValueError(f"--resume: {str(out)!r} holds no STaR run (no state.json)")
            self.state = json.loads(self.state_path.read_text())
            old = json.loads(saved_config.read_text())
            new = c.to_dict()
            diff = sorted(k for k in new if k not in c.resumable_changes and old.get(k) != new.get(k))
            if self.state.get("task") not in (None, self.fingerprint()):
                diff.append("the problems")
            if diff:
                shown = ", ".join(
                    k if k == "the problems" else f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:4]
                )
                raise ValueError(
                    f"--resume: the run in {str(out)!r} was started with other settings "
                    f"({shown}); give the same ones, or start afresh with --overwrite"
                )
        else:
            ours = [
                p
                for p in out.iterdir()
                if p.name in ("state.json", "config.json")
                or p.name.startswith("iteration-")
                or p.name.startswith("report.")
                or p.name == "accuracy.png"
            ]
            if ours and not c.overwrite:
                raise OutputDirError(
                    f"--output-dir {str(out)!r} already holds a STaR run: continue it with "
                    "--resume, start afresh with --overwrite, or choose another directory"
                )
            for p in ours:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        write_atomic(saved_config, json.dumps(c.to_dict(), indent=2) + "\n")
        self.state["task"] = self.fingerprint()
        self.save_state()

    def fingerprint(self) -> str:
        """A hash of the task's problems (ids, questions, answers, rationales of the exemplars): a
        resume must see the same ones."""
        t = self.task
        parts = [t.name, t.kind] + [
            f"{which}|{p.id}|{p.question}|{p.gold}|{p.rationale if which == 'x' else ''}"
            for which, ps in (("t", t.train), ("h", t.heldout), ("x", t.exemplars))
            for p in ps
        ]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def save_state(self) -> None:
        write_atomic(self.state_path, json.dumps(self.state, indent=2) + "\n")

    def it_state(self, n: int) -> dict:
        return self.state["iterations"].setdefault(str(n), {"phases": {}, "row": {}})

    def done(self, n: int, phase: str) -> bool:
        return phase in self.it_state(n)["phases"]

    def finish_phase(self, n: int, phase: str, seconds: float, **row) -> None:
        st = self.it_state(n)
        st["phases"][phase] = seconds
        st["row"].update(row)
        self.save_state()

    # --- models ------------------------------------------------------------------------------

    def model_of(self, n: int):
        """``M_n``: the starting model for 0, else iteration ``n``'s fine-tuned model. The last one
        loaded is kept for the next call (``M_n`` evaluates, then samples iteration ``n + 1``)."""
        from ..loading import load_model

        if self._model is not None and self._model[0] == n:
            return self._model[1]
        self._model = None
        gc.collect()
        spec = self.c.model if n == 0 else str(_it(self.out, n) / "train")
        model = load_model(spec, seed=self.c.seed, device=self.c.device or "cpu")
        if model.tokenizer is None:
            raise ValueError(f"--model {spec!r} has no tokenizer: STaR needs one to write prompts")
        self._model = (n, model)
        return model

    def drop_model(self) -> None:
        self._model = None
        gc.collect()

    def few_shot(self, n: int) -> bool:
        return n == 0 or self.c.few_shot_after_training

    # --- sampling ----------------------------------------------------------------------------

    def sample_phase(
        self,
        n: int,
        phase: str,
        model,
        problems: list[Problem],
        prompts: list[str],
        *,
        k: int,
        temperature: float,
        keep: bool,
        seen: set | None = None,
    ) -> list[dict]:
        """Sample ``k`` completions per problem into ``iteration-<n>/samples.jsonl`` (resuming after
        its last complete batch of this phase) and return this phase's records, in order."""
        c = self.c
        path = _it(self.out, n) / "samples.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        previous = [r for r in _read_samples(path) if r["phase"] == phase]
        done = {r["batch"] for r in previous}
        hinted = phase == "rationalization"
        seen = set() if seen is None else seen
        for r in previous:  # the dedup set as it was when the batches were written
            if r["kept"]:
                seen.add((r["problem_id"], " ".join(r["text"].split())))
        records = list(previous)
        batches = sample_batches(
            model,
            prompts,
            k=k,
            temperature=temperature,
            top_p=c.top_p,
            max_new_tokens=c.max_new_tokens,
            batch_size=c.batch_size,
            seed=c.seed,
            label=f"it{n}/{phase}",
            skip=done,
            progress=c.progress,
        )
        for b, rows, completions in batches:
            batch = []
            for j, (p_index, comp) in enumerate(zip(rows, completions)):
                p = problems[p_index]
                answer = self.task.extract(comp.text)
                correct = answer == p.gold
                why = None
                if not comp.finished:
                    why = "unfinished"
                elif not correct:
                    why = "wrong"
                elif hinted and HINT_MARKER in comp.text.lower():
                    why = "hint"
                elif keep and (p.id, " ".join(comp.text.split())) in seen:
                    why = "duplicate"
                kept = keep and why is None
                if kept:
                    seen.add((p.id, " ".join(comp.text.split())))
                batch.append(
                    {
                        "iteration": n,
                        "phase": phase,
                        "batch": b,
                        "batch_rows": len(rows),
                        "row": j,
                        "problem_id": p.id,
                        "question": p.question,
                        "gold": p.gold,
                        "hint": hinted,
                        "text": comp.text,
                        "finish_reason": comp.finish_reason,
                        "answer": answer,
                        "correct": correct,
                        "kept": kept,
                        "drop_reason": None if kept else why,
                    }
                )
            append_durably(path, "".join(json.dumps(r) + "\n" for r in batch))
            records += batch
        records.sort(key=lambda r: (r["batch"], r["row"]))
        return records

    # --- the phases --------------------------------------------------------------------------

    def generate_examples(self, n: int) -> None:
        """Phases 1 and 2 of iteration ``n``: sample, keep, rationalize; write ``examples.jsonl``."""
        c, task = self.c, self.task
        train = task.train
        model = None
        seen: set = set()
        if not self.done(n, "rationale"):
            t0 = time.perf_counter()
            model = self.model_of(n - 1)
            prompts = [task.prompt(p, few_shot=self.few_shot(n - 1)) for p in train]
            recs = self.sample_phase(
                n,
                "rationale",
                model,
                train,
                prompts,
                k=c.samples,
                temperature=c.temperature,
                keep=True,
                seen=seen,
            )
            self.finish_phase(
                n, "rationale", time.perf_counter() - t0, sample_seconds=time.perf_counter() - t0
            )
        recs = [r for r in _read_samples(_it(self.out, n) / "samples.jsonl") if r["phase"] == "rationale"]
        solved = {r["problem_id"] for r in recs if r["correct"] and r["finish_reason"] != "length"}
        unsolved = [p for p in train if p.id not in solved]
        rat_recs = []
        if c.rationalization and c.rationalization_samples > 0 and unsolved:
            if not self.done(n, "rationalization"):
                t0 = time.perf_counter()
                model = self.model_of(n - 1)
                seen = {(r["problem_id"], " ".join(r["text"].split())) for r in recs if r["kept"]}
                prompts = [task.prompt(p, few_shot=True, hint=True) for p in unsolved]
                self.sample_phase(
                    n,
                    "rationalization",
                    model,
                    unsolved,
                    prompts,
                    k=c.rationalization_samples,
                    temperature=c.temperature,
                    keep=True,
                    seen=seen,
                )
                dt = time.perf_counter() - t0
                self.finish_phase(n, "rationalization", dt, rationalize_seconds=dt)
            rat_recs = [
                r
                for r in _read_samples(_it(self.out, n) / "samples.jsonl")
                if r["phase"] == "rationalization"
            ]
        del model
        gc.collect()
        rationalized = {r["problem_id"] for r in rat_recs if r["kept"]}
        kept = [r for r in recs + rat_recs if r["kept"]]
        N = len(train)
        stats = dict(
            train_problems=N,
            train_accuracy=len(solved) / N,
            train_accuracy_with_rationalization=(len(solved) + len(rationalized)) / N,
            train_sample_accuracy=sum(r["correct"] for r in recs) / max(1, len(recs)),
            solved_by_rationale=len(solved),
            solved_by_rationalization=len(rationalized),
            unsolved=N - len(solved) - len(rationalized),
            kept_rationales=sum(r["phase"] == "rationale" for r in kept),
            kept_rationalizations=sum(r["phase"] == "rationalization" for r in kept),
            duplicates=sum(r["drop_reason"] == "duplicate" for r in recs + rat_recs),
            hint_leaks=sum(r["drop_reason"] == "hint" for r in rat_recs),
            unfinished=sum(r["drop_reason"] == "unfinished" for r in recs + rat_recs),
            dataset_size=len(kept),
        )
        self.it_state(n)["row"].update(stats)
        self.save_state()
        if not kept:
            how = f"{c.samples} sample(s) each" + (" and rationalization" if c.rationalization else "")
            raise ValueError(
                f"iteration {n}: no correct rationale for any of the {N} training problems ({how}), so "
                "there is nothing to fine-tune on; try more --samples, another --temperature, more "
                "--max-new-tokens, or an easier task"
            )
        examples = [
            {
                "problem_id": r["problem_id"],
                "phase": r["phase"],
                "prompt": task.prompt(self.by_id[r["problem_id"]], few_shot=c.few_shot_after_training),
                "completion": r["text"],
            }
            for r in kept
        ]
        write_atomic(_it(self.out, n) / "examples.jsonl", "".join(json.dumps(e) + "\n" for e in examples))

    def direct_examples(self, n: int) -> None:
        """The direct baseline's examples: every training problem's plain question and gold answer."""
        task = self.task
        examples = [
            {
                "problem_id": p.id,
                "phase": "direct",
                "prompt": task.prompt(p, few_shot=self.c.few_shot_after_training),
                "completion": task.answer_only(p),
            }
            for p in task.train
        ]
        _it(self.out, n).mkdir(parents=True, exist_ok=True)
        write_atomic(_it(self.out, n) / "examples.jsonl", "".join(json.dumps(e) + "\n" for e in examples))
        self.it_state(n)["row"].update(train_problems=len(task.train), dataset_size=len(examples))
        self.save_state()

    def finetune(self, n: int) -> None:
        from ..train import train

        c = self.c
        self.drop_model()  # the trainer builds its own
        lines = (_it(self.out, n) / "examples.jsonl").read_text().splitlines()
        examples = [(e["prompt"], e["completion"]) for e in map(json.loads, lines)]
        steps = steps_for_iteration(n, c.steps, c.step_growth)
        out = _it(self.out, n) / "train"
        resume = "latest" if (out / "latest").is_file() else None
        if c.restart or n == 1:
            base = c.model
        else:  # continue: the previous iteration's fine-tuned weights (new optimizer state)
            from ..loading import resolve_model_dir

            base = str(resolve_model_dir(_it(self.out, n - 1) / "train"))
        method = get_preset("default").method
        training = TrainingConfig(
            learning_rate=c.learning_rate,
            weight_decay=c.weight_decay,
            warmup_steps=min(c.warmup_steps, steps),
            decay_steps=max(1, steps - c.warmup_steps),
            batch_size=c.train_batch_size,
            micro_batch_size=c.micro_batch_size,
            max_steps=steps,
            seq_len=c.seq_len,
            precision=c.precision,
            seed=c.seed,
            log_every=max(1, steps // 10),
            save_every=c.save_every,
            log_sample_thoughts=0,
        )
        run = RunConfig(
            model=base,
            data=str(_it(self.out, n) / "examples.jsonl"),  # what the objective trains on (for the logs)
            output_dir=str(out),
            resume=resume,
            distributed=c.distributed,
            device=c.device,
            cpu_threads=c.cpu_threads,
            progress=c.progress,
            plot=c.plot,
            overwrite=resume is None,
        )
        t0 = time.perf_counter()
        objective = StarObjective(examples)
        result = train(method, training, run, objective)
        if objective.dropped:
            log.warning(
                "iteration %d: %d examples longer than --seq-len %d left out", n, objective.dropped, c.seq_len
            )
        dt = time.perf_counter() - t0
        losses = [r["loss"] for r in result.history]
        self.finish_phase(
            n, "finetune", dt, steps=steps, finetune_seconds=dt, final_loss=losses[-1] if losses else None
        )
        gc.collect()

    def evaluate(self, n: int) -> None:
        """``M_n`` on the held-out problems: greedy, and the majority of ``majority_samples``."""
        c, task = self.c, self.task
        t0 = time.perf_counter()
        model = self.model_of(n)
        held = task.heldout
        prompts = [task.prompt(p, few_shot=self.few_shot(n)) for p in held]
        greedy = self.sample_phase(
            n, "heldout-greedy", model, held, prompts, k=1, temperature=0.0, keep=False
        )
        row = {
            "heldout_problems": len(held),
            "heldout_greedy": sum(r["correct"] for r in greedy) / len(held),
            "majority_samples": c.majority_samples,
            "heldout_majority": None,
        }
        if c.majority_samples > 0:
            votes = self.sample_phase(
                n,
                "heldout-vote",
                model,
                held,
                prompts,
                k=c.majority_samples,
                temperature=c.temperature,
                keep=False,
            )
            answers: dict[str, list] = {}
            for r in votes:
                answers.setdefault(r["problem_id"], []).append(r["answer"])
            row["heldout_majority"] = sum(majority(answers[p.id]) == p.gold for p in held) / len(held)
        del model
        gc.collect()
        dt = time.perf_counter() - t0
        self.finish_phase(n, "eval", dt, eval_seconds=dt, **row)

    # --- the report --------------------------------------------------------------------------

    def rows(self) -> list[dict]:
        out = []
        for key in sorted(self.state["iterations"], key=int):
            st = self.state["iterations"][key]
            if "eval" not in st["phases"]:
                continue
            row = {"iteration": int(key), **st["row"]}
            row["seconds"] = sum(st["phases"].values())
            out.append(row)
        return out

    def report(self) -> list[dict]:
        rows = self.rows()
        c = self.c
        variant = c.method if c.rationalization or c.method == "direct" else "star, no rationalization"
        title = f"STaR ({variant}): {c.model} on {c.task}"
        write_report(self.out, rows, {"title": title, "config": c.to_dict()}, plot=c.plot)
        return rows


def run_star(config: StarConfig, task: Task | None = None) -> StarResult:
    """Run (or with ``config.resume``, continue) the loop of the module docstring; returns the
    report's rows. ``task``: a prebuilt :class:`~qstar.star.tasks.Task` (default: from the config)."""
    config.validate()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "STaR runs in one process: under torchrun every rank would sample and write the "
            "same files; launch it with python (the fine-tune is not distributed yet)"
        )
    if task is None:
        task = make_task(
            config.task,
            train=config.train,
            heldout=config.heldout,
            exemplars=config.exemplars_file,
            n_exemplars=config.n_exemplars,
            n_train=config.train_size,
            n_heldout=config.heldout_size,
            ops=config.ops,
            templates=config.templates,
        )
    if not task.heldout:
        raise ValueError(f"task {task.name!r}: the held-out set is empty")
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = RunDirLock(out)
    lock.acquire()
    try:
        run = _Run(config, task)
        run.prepare()
        if config.evaluate_start and not run.done(0, "eval"):
            run.evaluate(0)
            run.report()
        last = 1 if config.method == "direct" else config.iterations
        for n in range(1, last + 1):
            if run.done(n, "eval"):
                continue
            log.info("iteration %d of %d", n, last)
            if config.method == "direct":
                run.direct_examples(n)
            else:
                run.generate_examples(n)
            if not run.done(n, "finetune"):
                run.finetune(n)
            run.evaluate(n)
            rows = run.report()
            r = rows[-1]
            log.info(
                "iteration %d: held-out greedy %.3f, majority %s; %s examples; %.0f s",
                n,
                r["heldout_greedy"],
                r["heldout_majority"],
                r.get("dataset_size"),
                r["seconds"],
            )
        return StarResult(out, run.report())
    finally:
        lock.release()
