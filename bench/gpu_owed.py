"""Pay bench/GPU_OWED.md in as few device calls as possible: its checks in priority order, within a time budget.

    python3 bench/gpu_owed.py --out "$OUT"                  # every owed check, most valuable first
    python3 bench/gpu_owed.py --out "$OUT" C11 C8 C3        # these, in this order
    python3 bench/gpu_owed.py --list                        # the plan: ids, commands, time limits

A lent machine starts bare, is given back 30 s after a call and allows 10 minutes per call, so each call builds
specee and runs what fits. The checks come from GPU_OWED.md itself: a row's command is the first code span of
its command cell, or the block under "Script for <id>"; a cell that begins "same run as <id>" is paid by that
row's run; a cell that begins "manual" is listed, never run (tuning edits, profilers). Before the checks, the
CUDA extension is built for the local GPU's architecture when ``specee._C`` lacks its CUDA kernels
(``--no-build`` skips that). After every check ``$OUT/gpu_owed.json`` is rewritten (device, versions, commit;
per check: status, exit code, seconds, the tail of its output), the full output goes to ``$OUT/gpu_owed.log``
and the result files the checks wrote under bench/results/ to ``$OUT/results.tar.gz``, so a call cut off at its
limit still returns what ran. Whether a check *passed* is the row's pass column, read by a person from the log:
the exit code only says whether the command ran to its end.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OWED = REPO / "bench" / "GPU_OWED.md"
RESULTS = REPO / "bench" / "results"

# Most valuable first: correctness of what never ran (kernels, engine, graphs), then the measurements the issues'
# targets name, then the rest. (id, seconds it may take at most). Ids not listed run last, at DEFAULT_LIMIT.
PLAN = [("K1", 60), ("K7", 240), ("K5", 120), ("K8", 60), ("C10", 60), ("E1", 240), ("E4", 120), ("C1", 420),
        ("C4", 420), ("R1", 240), ("K9", 240), ("K10", 300), ("K3", 300), ("C11", 560), ("C7", 300), ("C8", 420),
        ("C3", 420), ("C6", 420), ("C9", 420), ("E3", 560), ("R2", 420), ("R3", 420), ("R4", 420), ("K11", 420),
        ("K4", 560), ("E2", 560), ("K6", 560), ("K12", 420)]
DEFAULT_LIMIT = 300
MIN_SLICE = 20  # seconds: a check is not started with less left than this


def parse_owed(text: str) -> dict:
    """{id: row} for every table row of GPU_OWED.md; row = dict(check, cell, status, command, alias, manual)."""
    scripts = dict(re.findall(r"Script for (\w+)[^\n]*\n+```bash\n(.*?)```", text, flags=re.S))
    rows = {}
    for line in text.splitlines():
        if not re.match(r"\|\s*[A-Z]+\d+\s*\|", line):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) != 5:
            raise ValueError(f"GPU_OWED.md row {cells[0]!r} has {len(cells)} cells, expected 5 "
                             "(id | check | command | pass | status); escape a | inside a cell as \\|.")
        rid, check, cell, _, status = cells
        alias = re.match(r"same run as (\w+)", cell)
        spans = re.findall(r"`([^`]+)`", cell)
        command = scripts.get(rid) or (spans[0] if spans else None)
        manual = cell.lower().startswith("manual")
        if not (alias or manual or command):
            raise ValueError(f"GPU_OWED.md row {rid} has no command: give it a code span, a 'Script for {rid}' "
                             "block, 'same run as <id>' or 'manual'.")
        rows[rid] = dict(check=check, cell=cell, status=status, command=None if alias or manual else command,
                         alias=alias.group(1) if alias else None, manual=manual)
    return rows


def plan(rows: dict, ids=None, include_done=False) -> list:
    """[(id, seconds)] to run: ``ids`` in the given order, else every owed row in PLAN's order, aliases dropped
    (their run pays them) and manual rows left out."""
    limits = dict(PLAN)
    if ids:
        unknown = [i for i in ids if i not in rows]
        if unknown:
            raise SystemExit(f"unknown check ids {unknown}; GPU_OWED.md has {', '.join(rows)}")
        order = [rows[i]["alias"] or i for i in ids]
    else:
        order = [i for i, _ in PLAN] + [i for i in rows if i not in limits]
        order = [i for i in order if i in rows and (include_done or rows[i]["status"].startswith("owed"))]
    seen, out = set(), []
    for i in order:
        row = rows[i]
        if i in seen or row["manual"] or row["alias"]:
            continue
        seen.add(i)
        out.append((i, limits.get(i, DEFAULT_LIMIT)))
    return out


def _tail(path: Path, start: int, n: int = 3000) -> str:
    with open(path, "rb") as f:
        f.seek(max(start, f.seek(0, 2) - n))
        text = f.read().decode(errors="replace")
    return text


@functools.cache
def command_env() -> dict:
    """The rows say ``python``, ``pip`` and ``specee``; the GPU machine's torch lives in a venv whose interpreter is
    ``python3`` and whose bin may not be on PATH. Make all three mean this interpreter's."""
    shims = Path(tempfile.gettempdir()) / "gpu_owed_bin"
    shims.mkdir(exist_ok=True)
    for name, line in (("python", f'exec "{sys.executable}" "$@"'), ("pip", f'exec "{sys.executable}" -m pip "$@"')):
        (shims / name).write_text(f"#!/bin/sh\n{line}\n")
        (shims / name).chmod(0o755)
    path = os.pathsep.join([str(shims), sysconfig.get_path("scripts"), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "PYTHONUNBUFFERED": "1"}


def run_check(command: str, limit: float, log: Path) -> dict:
    """Run ``command`` in bash from the repository root, its output appended to ``log``; on timeout its whole
    process group is killed (pipelines included)."""
    t, start = time.perf_counter(), log.stat().st_size
    with open(log, "ab") as f:
        p = subprocess.Popen(["bash", "-c", command], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True, env=command_env())
        try:
            rc, status = p.wait(timeout=limit), "ran"
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc, status = None, "timeout"
    return dict(status=status, rc=rc, seconds=round(time.perf_counter() - t, 1), tail=_tail(log, start))


def extension_state() -> str:
    """'built' (specee._C here has CUDA kernels), 'no GPU', or why it must be built."""
    code = ("import torch; assert torch.cuda.is_available(), 'no GPU'; import specee.ops; "
            "assert torch._C._dispatch_has_kernel_for_dispatch_key('specee::verify_sample', 'CUDA'), 'no CUDA kernels'")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    if p.returncode == 0:
        return "built"
    last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "specee does not import"
    return "no GPU" if "no GPU" in last else last


# The local GPU's architecture only (minutes less than setup.py's three); Hopper needs the 'a' variant for wgmma.
BUILD = ("arch=$(python -c \"import torch; print('%d%d' % torch.cuda.get_device_capability())\"); "
         "[ \"$arch\" = 90 ] && arch=90a; "
         "SPECEE_CUDA_ARCHS=$arch pip install --no-build-isolation --no-deps -v -e .")
# specee/_C*.so carried in from an earlier call: register the package and its command line, compile nothing.
REGISTER = "SPECEE_NO_EXT=1 pip install --no-build-isolation --no-deps -e ."


def setup(out: Path, log: Path, budget: float, say) -> dict | None:
    """Build (and hand the built extension back through ``out``, to be carried into the next call) or only
    register a carried one; nothing without a GPU."""
    state = extension_state()
    if state == "no GPU":
        return None
    if state == "built":
        if shutil.which("specee", path=command_env()["PATH"]):
            return None
        say(f"\n===== register the carried extension =====\n$ {REGISTER}\n")
        return run_check(REGISTER, budget, log)
    say(f"\n===== build ({state}) =====\n$ {BUILD}\n")
    res = run_check(BUILD, budget, log)
    for so in (REPO / "specee").glob("_C*.so"):
        if so.stat().st_mtime >= time.time() - res["seconds"] - 5:
            shutil.copy2(so, out / so.name)
    return res


def metadata() -> dict:
    sys.path.insert(0, str(REPO))
    from specee.bench import run_metadata

    return run_metadata()


def write(out: Path, doc: dict, started: float):
    (out / "gpu_owed.json").write_text(json.dumps(doc, indent=2) + "\n")
    new = [p for p in sorted(RESULTS.glob("*")) if p.is_file() and p.stat().st_mtime >= started]
    with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
        for p in new:
            tar.add(p, arcname=f"bench/results/{p.name}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ids", nargs="*", help="check ids to run, in this order (default: every owed one, by priority)")
    ap.add_argument("--out", type=Path, help="where the JSON, the log and the results archive go (e.g. $OUT)")
    ap.add_argument("--budget-s", type=float, default=570, help="stop starting checks after this many seconds")
    ap.add_argument("--no-build", action="store_true", help="never build the extension first")
    ap.add_argument("--include-done", action="store_true", help="with no ids: rerun checks already done too")
    ap.add_argument("--list", action="store_true", help="print the plan and exit")
    ap.add_argument("--owed-file", type=Path, default=OWED, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    rows = parse_owed(args.owed_file.read_text())
    todo = plan(rows, args.ids, args.include_done)
    if args.list:
        for i, limit in todo:
            paid = [j for j, r in rows.items() if r["alias"] == i]
            print(f"{i:>4} {limit:>4}s{' (also pays ' + ', '.join(paid) + ')' if paid else ''}: {rows[i]['command']}")
        manual = [i for i, r in rows.items() if r["manual"]]
        print(f"manual, not run: {', '.join(manual) or 'none'}")
        return 0
    if args.out is None:
        ap.error("--out is required (unless --list)")
    args.out.mkdir(parents=True, exist_ok=True)
    started, t0 = time.time(), time.perf_counter()
    doc = dict(meta=None, plan=[i for i, _ in todo], checks={})
    log = args.out / "gpu_owed.log"
    log.touch()

    def say(text):
        with open(log, "a") as f:
            f.write(text)

    if not args.no_build:
        doc["build"] = setup(args.out, log, args.budget_s, say)
    doc["meta"] = metadata()
    for i, limit in todo:
        left = args.budget_s - (time.perf_counter() - t0)
        if left < MIN_SLICE:
            doc["checks"][i] = dict(status="not reached")
            continue
        command = rows[i]["command"]
        say(f"\n===== {i}: {rows[i]['check'][:100]} =====\n$ {command}\n")
        res = run_check(command, min(limit, left), log)
        doc["checks"][i] = dict(command=command, pays=[i] + [j for j, r in rows.items() if r["alias"] == i], **res)
        print(f"{i}: {res['status']} rc={res['rc']} {res['seconds']}s", flush=True)
        write(args.out, doc, started)
    write(args.out, doc, started)
    ran = sum(c["status"] != "not reached" for c in doc["checks"].values())
    print(f"{ran} of {len(todo)} checks ran; {args.out / 'gpu_owed.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
