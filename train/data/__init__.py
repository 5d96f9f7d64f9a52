"""CT data for training: tasks, synthetic phantoms, dataset layouts and readers, slice cache.

`slices` (the torch Dataset) is imported on its own so that reading data never needs torch.
"""
from .layouts import Case, Dataset, detect_layout, open_dataset
from .tasks import TASKS, Task, get_task

__all__ = ["open_dataset", "detect_layout", "Dataset", "Case", "TASKS", "Task", "get_task"]
