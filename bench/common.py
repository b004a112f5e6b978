"""Shared by every benchmark: run metadata and the JSON writer for bench/results/."""
from __future__ import annotations

import json
from pathlib import Path

from specee.bench import run_metadata

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent

__all__ = ["RESULTS", "REPO", "run_metadata", "write_json", "default_prompt_file"]


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps({"meta": run_metadata(), **payload}, indent=2) + "\n")
    return path


def default_prompt_file() -> Path:
    """../shared/data/spec_bench_dev.jsonl beside the checkout (developers' and CI's layout)."""
    return REPO.parent / "shared" / "data" / "spec_bench_dev.jsonl"
