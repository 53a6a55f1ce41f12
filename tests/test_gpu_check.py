"""bench/gpu_check.py, the check run when a GPU machine is lent, exercised here on the CPU with tiny shapes
(`--device cpu --quick`): every section runs, the JSON holds numbers, and the accuracy section really
compares the GPU's code path with the literal formula."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def run_check(*args, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


def numbers(rows, *keys):
    return [row[k] for row in rows for k in keys]


def finite(values):
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    # the quick run takes ~10 s on 2 idle cores; the budget is raised so that a loaded machine skips no section
    done = run_check("--device", "cpu", "--quick", "--budget-s", "250", "--json", str(path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(path.read_text()), done.stdout


def test_quick_run_on_cpu_reports_every_section_with_numbers(quick_report):
    report, stdout = quick_report
    sections = report["sections"]
    assert list(sections) == ["accuracy", "speed", "memory", "throughput"]
    assert all(s["ok"] and s["seconds"] > 0 for s in sections.values()), sections
    accuracy = sections["accuracy"]["rows"]
    assert {(r["block"], r["fractal_depth"], r["precision"]) for r in accuracy} == {
        (block, depth, p) for block, depth in (("spectral", 1), ("spectral", 2), ("plain", None))
        for p in ("fp32", "bf16", "fp16")}
    assert finite(numbers(accuracy, "max_abs_error", "grad_max_abs_error", "grad_max_abs_reference"))
    speed = sections["speed"]["rows"]
    assert [r["seq_len"] for r in speed] == [32, 64] and finite(numbers(speed, "ours_ms", "plain_ms", "ratio"))
    memory = sections["memory"]["rows"]
    assert [r["gradient_checkpointing"] for r in memory] == [False, True]
    assert finite(numbers(memory, "estimated_bytes", "loss"))
    assert all(r["measured_bytes"] is None and r["note"] == "n/a on CPU" for r in memory)
    throughput = sections["throughput"]["rows"]
    assert [r["preset"] for r in throughput] == ["tiny"]
    assert finite(numbers(throughput, "steps_per_s", "triplets_per_s", "tokens_per_s", "loss"))
    assert "RANDOM token ids" in stdout and "s budget" in stdout
    assert report["quick"] and report["elapsed_s"] < report["budget_s"]


def test_quick_run_fp32_error_against_the_literal_formula_is_small(quick_report):
    """The GPU path (fractal_augment + SDPA, forced on the CPU) in fp32 matches the float64 literal formula;
    half precisions are looser but still close (outputs are LayerNorm-ed, so O(1))."""
    rows = quick_report[0]["sections"]["accuracy"]["rows"]
    for r in rows:
        if r["precision"] == "fp32":
            assert r["max_abs_error"] <= 1e-4 and r["grad_max_abs_error"] <= 1e-4 * r["grad_max_abs_reference"], r
        else:
            assert r["max_abs_error"] <= 0.1, r


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where no CUDA device is visible")
def test_without_cuda_it_says_so_and_exits_2():
    done = run_check("--json", "unused.json", timeout=120)
    assert done.returncode == 2 and "no CUDA device" in done.stderr and "--device cpu --quick" in done.stderr
    done = run_check("--device", "cpu", timeout=120)
    assert done.returncode == 2 and "only --quick runs" in done.stderr
    assert not (ROOT / "unused.json").exists()
