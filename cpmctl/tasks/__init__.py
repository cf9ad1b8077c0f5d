"""Tasks: what tune and eval both need to know about a task, and nothing about models.

schema.py (jsonl examples) <- templates.py (prompt filling) <- kinds.py (generation / choice / ranking: training
sequences and scoring) <- registry.py (the CUGE tasks and custom YAML tasks). metrics.py holds the pure metric
functions. Predicting with a model is cpmctl/evaluate/predict.py; training on task rows is cpmctl/tune/.
"""

from cpmctl.tasks.kinds import ChoiceTask, GenerationTask, RankingTask, Task, TrainingSequence, single_token
from cpmctl.tasks.registry import TASKS, get_task, load_custom_task, task_names
from cpmctl.tasks.schema import KINDS, SPLITS, ChoiceExample, Example, GenerationExample, RankingExample

__all__ = [
    "KINDS", "SPLITS", "TASKS", "ChoiceExample", "ChoiceTask", "Example", "GenerationExample", "GenerationTask",
    "RankingExample", "RankingTask", "Task", "TrainingSequence", "get_task", "load_custom_task",
    "single_token", "task_names",
]
