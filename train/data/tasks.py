"""The segmentation tasks regionkd knows: class names, label values and the default HU window.

Label values follow the public datasets (LiTS for liver, KiTS19 for kidney): 0 background,
1 organ, 2 tumour. The HU windows are the ones of Qin et al. (TMI 2021).
"""
from __future__ import annotations

from dataclasses import dataclass

from regionkd.sdk.errors import InputError


@dataclass(frozen=True)
class Task:
    name: str
    class_names: tuple[str, ...]
    label_values: tuple[int, ...]
    window: tuple[float, float]      # default HU window [lo, hi]
    organ_label: int = 1
    lesion_label: int = 2
    dataset: str = ""                # the public dataset whose convention the labels follow
    organ_components: int = 1        # connected organs a scan shows (two kidneys): what post-processing keeps

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


TASKS: dict[str, Task] = {
    "liver": Task("liver", ("background", "liver", "tumour"), (0, 1, 2), (-60.0, 140.0), dataset="LiTS"),
    "kidney": Task("kidney", ("background", "kidney", "tumour"), (0, 1, 2), (-200.0, 300.0), dataset="KiTS19",
                   organ_components=2),
}


def get_task(name: str) -> Task:
    """The Task called `name`; InputError listing the known tasks otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise InputError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None
