"""CT data for training: tasks, synthetic phantoms, dataset layouts and readers, slice cache.

`slices` (the torch Dataset) is imported on its own so that reading data never needs torch.
"""
from .layouts import Case, Dataset, ImageSet, detect_layout, open_dataset, open_images
from .tasks import TASKS, Task, get_task

__all__ = ["open_dataset", "open_images", "detect_layout", "Dataset", "ImageSet", "Case", "TASKS", "Task", "get_task"]
