"""STaR, the self-taught reasoner (Zelikman et al., 2022): the loop that Quiet-STaR generalises.

Sample a rationale and an answer for every training problem, keep the rationales that reach the
right answer, rationalize the misses with the answer as a hint, fine-tune on what was kept, repeat
(``docs/star.md``). The modules, one job each:

* :mod:`qstar.star.tasks`: problems, few-shot exemplars, prompts, answer extraction (word problems,
  GSM8K- and CommonsenseQA-format JSONL);
* :mod:`qstar.star.sampling`: batched KV-cached sampling through :func:`qstar.generate`;
* :mod:`qstar.star.finetune`: the masked next-token objective and the step schedule;
* :mod:`qstar.star.loop`: the outer loop, its files and its resume;
* :mod:`qstar.star.report`: the CSV/JSON report and the plot;
* :mod:`qstar.star.command`: ``qstar-star`` / ``python -m qstar.star``.
"""

from __future__ import annotations

from .config import StarConfig
from .finetune import StarObjective, build_rows, steps_for_iteration
from .loop import StarResult, run_star
from .tasks import (
    Problem,
    Task,
    WordProblemTask,
    csqa_task,
    extract_letter,
    extract_number,
    gsm8k_task,
    make_task,
)

__all__ = [
    "Problem",
    "StarConfig",
    "StarObjective",
    "StarResult",
    "Task",
    "WordProblemTask",
    "build_rows",
    "csqa_task",
    "extract_letter",
    "extract_number",
    "gsm8k_task",
    "make_task",
    "run_star",
    "steps_for_iteration",
]
