"""The architecture's rules, checked on the source so that a change which breaks one fails here:
the runtime names no training framework or package, benchmarks import library modules only,
volume prediction and Dice each live in one place, and CLIs only parse."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def sources(folder: str) -> list[Path]:
    return sorted(p for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts)


def calls_of(name: str, folders=("sdk", "train", "export", "benchmarks")) -> list[str]:
    """'file:function' for every call of `name` in the package sources."""
    found = []
    for folder in folders:
        for path in sources(folder):
            tree = ast.parse(path.read_text())
            for fn in ast.walk(tree):
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    for node in ast.walk(fn):
                        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == name:
                            found.append(f"{path.relative_to(REPO)}:{fn.name}")
    return sorted(set(found))


def test_the_runtime_names_no_training_framework_or_package():
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in sources("sdk")
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(r"torch|regionkd\.train|regionkd\.export", line, re.IGNORECASE)]
    assert offenders == []


def imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_benchmarks_import_library_modules_never_cli_modules():
    """Benchmarks use the library; where one runs a command as a user would, it runs it as a process."""
    offenders = [f"{p.name}: {m}" for p in sources("benchmarks") for m in imported_modules(p)
                 if re.fullmatch(r"regionkd\.\w+\.cli\w*", m)]
    assert offenders == []


def test_one_volume_prediction_loop_and_one_dice():
    # the logits of a volume's slices become labels in one place: the Segmenter
    assert calls_of("logits_to_labels") == ["sdk/segmenter.py:_label_slices"]
    # the one Dice formula (train/metrics.py); everything else pools with DiceAccumulator. The soft
    # Dice of the training loss (train/losses.py) is a differentiable loss on probabilities, not a metric
    assert [p.relative_to(REPO).as_posix() for folder in ("sdk", "train", "export", "benchmarks")
            for p in sources(folder) if re.search(r"2(\.0)? \* (inter|intersection)\b", p.read_text())
            and p.name != "losses.py"] == ["train/metrics.py"]


@pytest.mark.parametrize("cli", ["sdk/cli_segment.py", "sdk/cli_bench.py", "export/cli.py"])
def test_command_modules_only_parse_and_call(cli):
    """No CLI module reads volumes, runs models or computes metrics itself."""
    text = (REPO / cli).read_text()
    for forbidden in ("read_nifti(", "InferenceSession", "preprocess_slices(", ".run(batch", "DiceAccumulator",
                      "measure(", "from tqdm"):
        assert forbidden not in text, (cli, forbidden)
