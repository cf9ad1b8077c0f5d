"""The task registry: the six CUGE tasks CPM-Ant was tuned and scored on, and user tasks defined in YAML
(docs/tasks.md). `get_task` is the one way in for tune, eval and the lifecycle.

Each built-in task comes in two templates:
- `original` (the default): as CPM-Live's examples/tune.py and infer.py build the inputs, so adapters trained by
  the original code (`tune import-delta`) and adapters trained here see the same thing: prompt task 1, then
  `<s>` + the raw input (choice: + the option + "[是否正确]"; ranking: query + document + "[是否正确]"), cut
  from the front when too long; CCPM is a generation task (its answer is generated), and generation tasks decode
  with beam search (3 beams) as infer.py does.
- `cpmctl`: cpmctl's own templates with a few words of instruction (摘要：, 回复：, 答案：...), prompt task 2, and
  CCPM as a choice task scored by the "是" logit of each option.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from cpmctl import CpmctlError
from cpmctl.model.generation_config import GenerationConfig
from cpmctl.recipe import load_yaml
from cpmctl.tasks.kinds import CHOICE_SUFFIX, ChoiceTask, GenerationTask, RankingTask, Task
from cpmctl.tasks.schema import KINDS


TaskTemplate = Literal["original", "cpmctl"]
TEMPLATES = get_args(TaskTemplate)
DEFAULT_TEMPLATE = "original"
ORIGINAL_PROMPT_TASK = 1  # examples/tune.py and infer.py: task_id=1


def _original() -> dict[str, Task]:
    """The six tasks as CPM-Live's examples tune and infer them (examples/scripts/*.sh for lengths and lr)."""
    beam = lambda n: GenerationConfig("beam", beam_size=3, max_new_tokens=n)  # noqa: E731 - infer.py's beam search
    p = ORIGINAL_PROMPT_TASK
    tasks = [
        GenerationTask("ccpm", "classical poetry matching, generated as the original tuned it (input holds the "
                       "sentence and the options; the target is the answer)", template="{input}", prompt_task_id=p,
                       keep="tail", metrics=("exact_match",), max_target_length=8, decode=beam(1)),
        ChoiceTask("c3", "free-form multiple-choice reading comprehension (passage and question in input)",
                   template="{input}{option}" + CHOICE_SUFFIX, prompt_task_id=p, max_length=1024, keep="tail"),
        RankingTask("sogou-log", "query-document relevance ranking from search logs",
                    template="{query}{document}" + CHOICE_SUFFIX, prompt_task_id=p, keep="tail"),
        GenerationTask("lcsts", "short-text summarization", template="{input}", prompt_task_id=p, keep="tail",
                       metrics=("rouge",), max_target_length=64, decode=beam(50)),
        GenerationTask("kdconv", "knowledge-grounded multi-turn dialogue (knowledge and history in input)",
                       template="{input}", prompt_task_id=p, keep="tail", metrics=("bleu", "distinct"),
                       max_length=1500, decode=beam(50)),
        GenerationTask("math23k", "math word problems: generate the equation x=...; scored on its value",
                       template="{input}", prompt_task_id=p, keep="tail", metrics=("math",), max_target_length=48,
                       decode=beam(32)),
    ]
    return {t.name: t for t in tasks}


def _builtin() -> dict[str, Task]:
    """cpmctl's own templates."""
    tasks = [
        ChoiceTask("ccpm", "classical poetry matching: pick the line of poetry a modern Chinese sentence describes",
                   template="{input}对应的诗句：{option}" + CHOICE_SUFFIX),
        ChoiceTask("c3", "free-form multiple-choice reading comprehension (passage and question in input)",
                   template="{input}答案：{option}" + CHOICE_SUFFIX, max_length=512, keep="tail"),
        RankingTask("sogou-log", "query-document relevance ranking from search logs"),
        GenerationTask("lcsts", "short-text summarization", template="{input}摘要：", metrics=("rouge",),
                       max_target_length=64, decode=GenerationConfig("beam", beam_size=3, max_new_tokens=50)),
        GenerationTask("kdconv", "knowledge-grounded multi-turn dialogue (knowledge and history in input)",
                       template="{input}回复：", keep="tail", metrics=("bleu", "distinct"), max_length=512,
                       decode=GenerationConfig("beam", beam_size=3, max_new_tokens=50, repetition_penalty=1.2)),
        GenerationTask("math23k", "math word problems: generate the equation x=...; scored on its value",
                       template="{input}列式：", metrics=("math",), max_target_length=48,
                       decode=GenerationConfig("greedy", max_new_tokens=48)),
    ]
    return {t.name: t for t in tasks}


TASKS: dict[str, Task] = _builtin()
ORIGINAL_TASKS: dict[str, Task] = _original()
BUILTIN = {"original": ORIGINAL_TASKS, "cpmctl": TASKS}
TASK_CLASSES = {"generation": GenerationTask, "choice": ChoiceTask, "ranking": RankingTask}
CUSTOM_KEYS = {"name", "kind", "description", "template", "prompt_task_id", "max_length", "truncate", "keep",
               "fields", "metrics", "max_target_length", "decode", "ks"}


def task_names() -> list[str]:
    return list(TASKS) + ["custom"]


def load_custom_task(path: str | Path) -> Task:
    """A user task from YAML: kind, template and metrics (see docs/tasks.md)."""
    path = Path(path)
    data = load_yaml(path)
    unknown = sorted(set(data) - CUSTOM_KEYS)
    if unknown:
        raise CpmctlError(f"{path}: unknown task key '{unknown[0]}' (known: {', '.join(sorted(CUSTOM_KEYS))})")
    kind = data.get("kind")
    if kind not in TASK_CLASSES:
        raise CpmctlError(f"{path}: key 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    cls = TASK_CLASSES[kind]
    kwargs = {k: v for k, v in data.items() if k != "kind"}
    kwargs.setdefault("name", path.stem)
    if not isinstance(kwargs["name"], str) or not kwargs["name"]:
        raise CpmctlError(f"{path}: key 'name' must be a non-empty string")
    for key, types, what in (("template", str, "a string"), ("description", str, "a string"),
                             ("prompt_task_id", int, "an integer"), ("max_length", int, "an integer"),
                             ("max_target_length", int, "an integer"), ("fields", dict, "a mapping"),
                             ("decode", dict, "a mapping"), ("metrics", list, "a list"), ("ks", list, "a list"),
                             ("truncate", str, "a string"), ("keep", str, "a string")):
        if key in kwargs and (not isinstance(kwargs[key], types) or isinstance(kwargs[key], bool)):
            raise CpmctlError(f"{path}: key '{key}' must be {what}")
    if "max_target_length" in kwargs and kind != "generation":
        raise CpmctlError(f"{path}: key 'max_target_length' is for generation tasks only")
    if "decode" in kwargs and kind != "generation":
        raise CpmctlError(f"{path}: key 'decode' is for generation tasks only")
    if "ks" in kwargs and kind != "ranking":
        raise CpmctlError(f"{path}: key 'ks' is for ranking tasks only")
    if "prompt_task_id" in kwargs and not 0 <= kwargs["prompt_task_id"] < 32:
        raise CpmctlError(f"{path}: key 'prompt_task_id' must be in 0..31")
    for k in ("metrics", "ks"):
        if k in kwargs:
            kwargs[k] = tuple(kwargs[k])
    if "decode" in kwargs:
        try:
            kwargs["decode"] = GenerationConfig().updated(kwargs["decode"])
        except CpmctlError as e:
            raise CpmctlError(f"{path}: {e}") from None
    try:
        return cls(**kwargs)
    except CpmctlError as e:
        raise CpmctlError(f"{path}: {e}") from None


def get_task(name: str, definition: str | Path | None = None, template: str = DEFAULT_TEMPLATE) -> Task:
    """A built-in task by name in one of TEMPLATES, or `custom` with a YAML definition (a .yaml path given as the
    name also works; its own template applies)."""
    if name == "custom" or name.endswith((".yaml", ".yml")):
        path = definition if name == "custom" else name
        if path is None:
            raise CpmctlError("--task custom needs a task definition: --task-def FILE.yaml")
        if not Path(path).exists():
            raise CpmctlError(f"task definition not found: {path}")
        return load_custom_task(path)
    if template not in BUILTIN:
        raise CpmctlError(f"task template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    if name not in TASKS:
        raise CpmctlError(f"unknown task '{name}' (one of {', '.join(task_names())})")
    return BUILTIN[template][name]
