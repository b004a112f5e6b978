"""bench/gpu_owed.py: the runner that pays bench/GPU_OWED.md on a lent GPU, exercised on the CPU with stand-in rows."""
import importlib.util
import json
import sys
import tarfile
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def owed():
    spec = importlib.util.spec_from_file_location("gpu_owed", BENCH / "gpu_owed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_real_file_has_a_command_for_every_check(owed):
    rows = owed.parse_owed((BENCH / "GPU_OWED.md").read_text())
    assert {"K1", "K8", "E1", "R2", "C10", "C11"} <= set(rows)
    for rid, row in rows.items():
        assert row["manual"] or row["alias"] or row["command"], rid
        if row["alias"]:
            assert row["alias"] in rows and rows[row["alias"]]["command"], f"{rid} is paid by a row that runs"
    assert "graphs OK" in rows["K8"]["command"] and "cond in a CUDA graph" in rows["C10"]["command"]
    listed = {i for i, _ in owed.PLAN}
    assert listed <= set(rows), f"PLAN names checks GPU_OWED.md does not have: {listed - set(rows)}"
    runnable = {i for i, r in rows.items() if r["command"]}
    assert runnable <= listed, f"give these a place and a time limit in PLAN: {runnable - listed}"
    assert not {i for i, r in rows.items() if r["manual"] or r["alias"]} & listed


FAKE = """# owed
| id | check | command | pass | status |
|---|---|---|---|---|
| A1 | says hello | `echo hello \\| tr a-z A-Z` then look | HELLO | owed |
| A2 | fails | `echo broken; exit 3` | - | owed |
| A3 | hangs in a pipeline | `sleep 30 \\| cat` | - | owed |
| A4 | the same run as A1 | same run as A1 (it prints both) | - | owed |
| A5 | needs an edit | manual: change kFoo and rebuild | - | owed |
| A6 | an inline script | the script below | - | owed |
| A7 | already paid | `echo again` | - | done 2026-01-01 H100: fine |
| A8 | writes a result | `echo '{}' > bench/results/_gpu_owed_test.json` | - | owed |
| A9 | finds this interpreter as python | `python -c "import sys; print(sys.executable)"; pip --version` | - | owed |

Script for A6 (from the root):

```bash
python - <<'EOF'
print("script", 6 * 7)
EOF
```
"""


def test_runner_runs_what_is_owed_and_reports_each_check(owed, tmp_path, monkeypatch):
    md = tmp_path / "owed.md"
    md.write_text(FAKE)
    monkeypatch.setattr(owed, "PLAN", [("A6", 60), ("A3", 2), ("A1", 60), ("A2", 60)])
    result = owed.RESULTS / "_gpu_owed_test.json"
    try:
        t = time.perf_counter()
        assert owed.main(["--owed-file", str(md), "--out", str(tmp_path / "out"), "--no-build"]) == 0
        assert time.perf_counter() - t < 20, "the hung pipeline was killed at its limit"
        doc = json.loads((tmp_path / "out" / "gpu_owed.json").read_text())
        with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
            archived = tar.getnames()
    finally:
        result.unlink(missing_ok=True)
    assert doc["plan"] == ["A6", "A3", "A1", "A2", "A8", "A9"], \
        "PLAN's order, then unlisted owed rows; done, manual and alias rows left out"
    c = doc["checks"]
    assert c["A6"]["rc"] == 0 and "script 42" in c["A6"]["tail"]
    assert c["A3"]["status"] == "timeout" and c["A3"]["rc"] is None
    assert c["A1"]["rc"] == 0 and "HELLO" in c["A1"]["tail"] and c["A1"]["pays"] == ["A1", "A4"]
    assert c["A2"]["status"] == "ran" and c["A2"]["rc"] == 3 and "broken" in c["A2"]["tail"]
    assert "torch" in doc["meta"] and "commit" in doc["meta"]
    assert sys.executable in c["A9"]["tail"] and "pip " in c["A9"]["tail"]
    assert "bench/results/_gpu_owed_test.json" in archived
    log = (tmp_path / "out" / "gpu_owed.log").read_text()
    assert log.index("===== A6") < log.index("script 42") < log.index("===== A3") < log.index("HELLO")


def test_runner_ids_budget_and_list(owed, tmp_path, capsys):
    md = tmp_path / "owed.md"
    md.write_text(FAKE)
    out = tmp_path / "out"
    # ids in the order given; an alias runs its row; a budget below one slice starts nothing
    assert owed.main(["--owed-file", str(md), "--out", str(out), "--no-build", "A4", "A2", "A7"]) == 0
    doc = json.loads((out / "gpu_owed.json").read_text())
    assert doc["plan"] == ["A1", "A2", "A7"] and doc["checks"]["A7"]["rc"] == 0
    assert owed.main(["--owed-file", str(md), "--out", str(out), "--no-build", "--budget-s", "5", "A1"]) == 0
    assert json.loads((out / "gpu_owed.json").read_text())["checks"] == {"A1": {"status": "not reached"}}
    assert owed.main(["--owed-file", str(md), "--list"]) == 0
    text = capsys.readouterr().out
    assert "A1" in text and "also pays A4" in text and "manual, not run: A5" in text
    with pytest.raises(SystemExit, match="unknown check ids"):
        owed.main(["--owed-file", str(md), "--out", str(out), "B9"])


def test_rows_without_a_command_are_refused(owed):
    bad = FAKE.replace("`echo broken; exit 3`", "run it somehow")
    with pytest.raises(ValueError, match="A2 has no command"):
        owed.parse_owed(bad)
    with pytest.raises(ValueError, match=r"escape a \| inside a cell"):
        owed.parse_owed(FAKE.replace("`echo hello \\| tr a-z A-Z`", "`echo hello | tr a-z A-Z`"))


def test_setup_builds_once_and_hands_the_extension_back(owed, tmp_path, monkeypatch):
    """A bare machine builds and returns specee/_C*.so through --out; a call that carries it in only registers."""
    repo, out, log = tmp_path / "repo", tmp_path / "out", tmp_path / "log"
    (repo / "specee").mkdir(parents=True)
    out.mkdir()
    log.touch()
    monkeypatch.setattr(owed, "REPO", repo)
    monkeypatch.setattr(owed, "BUILD", "echo compiling && touch specee/_C.cpython-312-x86_64-linux-gnu.so")
    monkeypatch.setattr(owed, "REGISTER", "echo registered")
    said = []
    monkeypatch.setattr(owed, "extension_state", lambda: "no CUDA kernels")
    res = owed.setup(out, log, 30, said.append)
    assert res["rc"] == 0 and (out / "_C.cpython-312-x86_64-linux-gnu.so").exists()
    assert "build (no CUDA kernels)" in said[0] and "compiling" in log.read_text()
    monkeypatch.setattr(owed, "extension_state", lambda: "built")
    monkeypatch.setattr(owed.shutil, "which", lambda name, path=None: None)
    assert owed.setup(out, log, 30, said.append)["rc"] == 0 and "registered" in log.read_text()
    monkeypatch.setattr(owed.shutil, "which", lambda name, path=None: "/usr/bin/specee")
    assert owed.setup(out, log, 30, said.append) is None
    monkeypatch.setattr(owed, "extension_state", lambda: "no GPU")
    assert owed.setup(out, log, 30, said.append) is None
