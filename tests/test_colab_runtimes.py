"""The notebooks as Colab runs them: each on its own runtime, sharing nothing but Drive.

Every runtime is a fresh copy of the repository (the files a clone at this commit holds) with its own
HOME, so its own data cache, and a kernel of its own (tests/colab_runtime.py); a folder named by
NSA_FAKE_DRIVE stands for MyDrive, through the same code path as the real mount. A runtime's folder is
deleted when it ends, as a disconnect wipes Colab's disk, so no later runtime can read it.

    runtime 0   01_setup and 02_train for RUN_NAME "ref", uninterrupted: the reference losses
    runtime 1   01_setup for "run1"
    runtime 2   02_train for "run1", interrupted mid-run (the stop button: KeyboardInterrupt)
    runtime 3   02_train for "run1" again, as opened from its badge after a disconnect: resumes from Drive
    runtime 4   03_monitor for "run1": the finished run, read from Drive
    runtime 5   04_evaluate for "run1": its best model from Drive, against the baseline; results to Drive
    runtime 6   05_export for "run1": its best model from Drive in every format, checked; exports to Drive
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nsa_lib.runfolder import checkpoint_step, is_checkpoint_name, verify_folder

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24  # NSA_SMOKE_STEPS: long enough to be interrupted in the middle


def new_runtime(tmp: Path, name: str) -> tuple[Path, dict]:
    """A fresh runtime: the repository's files as a clone has them, an empty HOME, its own caches."""
    runtime = tmp / name
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for rel in files:
        if (ROOT / rel).is_file():
            (runtime / "repo" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, runtime / "repo" / rel)
    home = runtime / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("NSA_DATA_DIR", "HF_HOME", "MPLCONFIGDIR", "PYTHONPATH")}
    env.update(HOME=str(home), CI="true", NSA_FAKE_DRIVE=str(tmp / "drive"), NSA_SMOKE_STEPS=str(STEPS),
               HF_HUB_OFFLINE="1", JUPYTER_PLATFORM_DIRS="1")
    return runtime, env


def run_notebook(runtime: Path, env: dict, name: str, *extra: str) -> subprocess.CompletedProcess:
    notebook = runtime / "repo" / "notebooks" / f"{name}.ipynb"
    return subprocess.run([sys.executable, str(runtime / "repo" / "tests" / "colab_runtime.py"), str(notebook),
                           str(runtime / f"{name}.out.ipynb"), *extra], cwd=runtime / "repo", env=env,
                          capture_output=True, text=True, timeout=900)


def end(runtime: Path) -> None:
    """The runtime is gone: its disk with it."""
    shutil.rmtree(runtime)


def step_losses(metrics: Path) -> dict[int, float]:
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def outputs_text(notebook: Path) -> str:
    cells = json.loads(notebook.read_text())["cells"]
    return "".join(o.get("text", "") if isinstance(o.get("text"), str) else "".join(o.get("text", []))
                   for c in cells for o in c.get("outputs", []))


@pytest.mark.slow
def test_each_notebook_on_its_own_runtime_sharing_only_drive(tmp_path):
    drive = tmp_path / "drive"
    runs = drive / "spectra-nsa"

    rt0, env = new_runtime(tmp_path, "runtime0")
    for name in ("01_setup", "02_train"):
        done = run_notebook(rt0, env, name, "--set", 'RUN_NAME="ref"')
        assert done.returncode == 0, (name, done.stderr[-3000:])
    end(rt0)

    rt1, env = new_runtime(tmp_path, "runtime1")
    done = run_notebook(rt1, env, "01_setup")
    assert done.returncode == 0, done.stderr[-3000:]
    planned = json.loads((runs / "run1" / "run_config.json").read_text())
    assert (planned["base_model"], planned["preset"]) == ("all-MiniLM-L6-v2", "custom")  # the default: a warm start
    end(rt1)

    rt2, env = new_runtime(tmp_path, "runtime2")
    done = run_notebook(rt2, env, "02_train", "--interrupt-after-steps", "8",
                        "--metrics", str(runs / "run1" / "metrics.jsonl"))
    assert done.returncode == 3, (done.stdout[-2000:], done.stderr[-3000:])  # interrupted in the training cell
    reached = max(step_losses(runs / "run1" / "metrics.jsonl"))
    assert 8 <= reached < STEPS
    backups = sorted(checkpoint_step(p.name) for p in (runs / "run1" / "backups").iterdir() if is_checkpoint_name(p.name))
    assert backups[-1] == reached  # the interrupt saved and backed up the last whole step, not only step 6
    final = json.loads((runs / "run1" / "final" / "final.json").read_text())
    assert {k: final[k] for k in ("step", "total_steps", "complete")} == {"step": reached, "total_steps": STEPS,
                                                                           "complete": False}
    assert final["data"] == "snli" and final["init_from"] == "all-MiniLM-L6-v2"
    assert (runs / "run1" / "dashboard.png").is_file()
    end(rt2)

    rt3, env = new_runtime(tmp_path, "runtime3")
    assert not (rt3 / "repo" / "work").exists()  # nothing local: everything must come from Drive
    done = run_notebook(rt3, env, "02_train")
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (runs / "run1" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("resumed_from") == f"ckpt-{reached:07d}" for r in records)
    end(rt3)

    rt4, env = new_runtime(tmp_path, "runtime4")
    done = run_notebook(rt4, env, "03_monitor")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"last step seen: {STEPS}" in outputs_text(rt4 / "03_monitor.out.ipynb")
    end(rt4)

    rt5, env = new_runtime(tmp_path, "runtime5")
    done = run_notebook(rt5, env, "04_evaluate")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((runs / "run1" / "eval" / "results.json").read_text())
    assert set(results) == {"Spectra-NSA", "all-MiniLM-L6-v2"}
    assert "anomaly" in results["Spectra-NSA"] and "anomaly" not in results["all-MiniLM-L6-v2"]
    assert -1 <= results["all-MiniLM-L6-v2"]["stsb-test"]["spearman"] <= 1
    assert {"tasks.png", "matryoshka.png", "anomaly.png", "results.md"} <= {p.name for p in (runs / "run1" / "eval").iterdir()}
    ablation = json.loads((runs / "run1" / "ablation" / "report" / "results.json").read_text())
    assert set(ablation) == {"full", "no-spectral"}
    end(rt5)

    rt6, env = new_runtime(tmp_path, "runtime6")
    done = run_notebook(rt6, env, "05_export")
    assert done.returncode == 0, done.stderr[-3000:]
    exports = runs / "run1" / "export"
    assert {p.name for p in exports.iterdir() if p.is_dir()} >= {"hf", "sentence-transformers", "onnx", "int8"}
    for fmt in ("onnx", "sentence-transformers"):
        assert json.loads((exports / fmt / "export.json").read_text())["parity"] <= 1e-4, fmt
    assert (exports / "int8" / "model.onnx").stat().st_size < (exports / "onnx" / "model.onnx").stat().st_size
    # the same bound as tests/test_export.py: int8 turns the embedding a little, by how much depends on the
    # model exported (measured: 0.947 on the untrained warm start, 0.9488 on this runtime's best/ model)
    assert 0.9 < json.loads((exports / "int8" / "export.json").read_text())["min_cosine"] <= 1.0 + 1e-6
    assert {"modules.json", "README.md"} <= {p.name for p in (exports / "sentence-transformers").iterdir()}
    end(rt6)

    # the run resumed exactly: every step's loss equals the uninterrupted run's
    expected, got = step_losses(runs / "ref" / "metrics.jsonl"), step_losses(runs / "run1" / "metrics.jsonl")
    assert sorted(got) == list(range(1, STEPS + 1)) and got == expected
    # and everything it produced is on Drive
    for name in ("final", "best"):
        assert verify_folder(runs / "run1" / name) is None, name
    assert json.loads((runs / "run1" / "final" / "final.json").read_text())["complete"] is True
    assert json.loads((runs / "run1" / "final" / "config.json").read_text())["architecture"] == "bert"
    assert (runs / "run1" / "dashboard.png").stat().st_size > 10_000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("runtime")]  # each runtime's disk is gone


def test_the_committed_notebooks_are_what_generate_py_writes(tmp_path):
    """notebooks/generate.py is where the notebooks are edited: a change made only in an .ipynb file would be
    lost at the next generation (as 04_evaluate's text about ood_score once nearly was)."""
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "notebooks").mkdir()
    subprocess.run([sys.executable, str(root / "notebooks" / "generate.py")], cwd=tmp_path, check=True)
    written = sorted(p.name for p in (tmp_path / "notebooks").glob("*.ipynb"))
    assert written == sorted(p.name for p in (root / "notebooks").glob("*.ipynb")) and len(written) == 5
    for name in written:
        assert (tmp_path / "notebooks" / name).read_text() == (root / "notebooks" / name).read_text(), name
