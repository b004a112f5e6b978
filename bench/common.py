"""Shared by every benchmark: run metadata and the JSON writer for bench/results/."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def run_metadata() -> dict:
    """Device, versions, commit and date: every result file carries them."""
    import torch

    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)",
    }
    for pkg in ("transformers", "triton"):
        try:
            meta[pkg] = __import__(pkg).__version__
        except ImportError:
            meta[pkg] = None
    return meta


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps({"meta": run_metadata(), **payload}, indent=2) + "\n")
    return path


def default_prompt_file() -> Path:
    """../shared/data/spec_bench_dev.jsonl beside the checkout (developers' and CI's layout)."""
    return REPO.parent / "shared" / "data" / "spec_bench_dev.jsonl"
