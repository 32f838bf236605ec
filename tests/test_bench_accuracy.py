"""The chunking of bench/accuracy.py (the bench itself drives real vLLM): a table saved
after every configuration is resumed only by a run of the same table."""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_accuracy", Path(__file__).resolve().parents[1] / "bench" / "accuracy.py")
accuracy = importlib.util.module_from_spec(_spec)
sys.modules["bench_accuracy"] = accuracy
_spec.loader.exec_module(accuracy)


def _args(table, **changes):
    base = dict(resume=True, json=str(table), split="hard", num=400, path="vllm", labels={})
    return argparse.Namespace(**(base | changes))


def test_a_saved_table_is_resumed_by_the_same_table_only(tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy, "MODEL", str(tmp_path / "clone-a" / "shapes-llava-v2"))
    path = tmp_path / "table.json"
    args = _args(path, labels={"rcp": "rcp (untrained)"})
    assert accuracy._resumed(args) is None  # nothing saved yet
    full = {"accuracy": 0.77, "per_type": {"count": 0.6}, "seconds": 350.0}
    done = {"dcp": {"64": {"accuracy": 0.36, "spec": "dcp:64"}}}
    accuracy._save(args, full, done)
    # another clone of the same checkpoint continues it
    monkeypatch.setattr(accuracy, "MODEL", str(tmp_path / "clone-b" / "shapes-llava-v2/"))
    saved = accuracy._resumed(_args(path))
    assert (saved["full"], saved["methods"], saved["labels"]) == (full, done, args.labels)
    assert accuracy._resumed(_args(path, resume=False)) is None
    for other in (dict(num=200), dict(split="standard"), dict(path="transformers")):
        with pytest.raises(SystemExit, match="another table"):
            accuracy._resumed(_args(path, **other))
    monkeypatch.setattr(accuracy, "MODEL", str(tmp_path / "shapes-llava"))
    with pytest.raises(SystemExit, match="shapes-llava-v2"):
        accuracy._resumed(_args(path))
    assert json.loads(path.read_text())["model"] == "shapes-llava-v2"


def test_markdown_table_ranks_by_the_middle_budget_and_marks_missing_results():
    saved = {"split": "hard", "num": 400, "full": {"accuracy": 0.8},
             "labels": {"rcp": "rcp (shipped modules)"},
             "methods": {"random": {"64": {"accuracy": 0.4}, "16": {"accuracy": 0.2}},
                         "rcp": {"64": {"accuracy": 0.6}},
                         "dcp": {}}}
    lines = accuracy.markdown_table(saved, [192, 64, 16]).splitlines()
    assert lines[0] == "| hard, 400 questions | 192 | 64 | 16 |"
    assert lines[2] == "| full tokens | 0.800 | | |"
    assert lines[3:] == ["| rcp (shipped modules) | not yet | 0.600 (75%) | not yet |",
                         "| random | not yet | 0.400 (50%) | 0.200 (25%) |",
                         "| dcp | not yet | not yet | not yet |"]
