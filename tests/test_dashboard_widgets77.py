"""The dashboard under ipywidgets 7.7.1, the version Colab's frontend runs (the project's own venv has 8).

A virtualenv made once per session on top of the project's: `python -m venv --system-site-packages` from
.venv's python alone would see only the base interpreter's packages (the venv's "home"), so a .pth file
adds .venv's site-packages after the new venv's own; pip then installs ipywidgets==7.7.1 there, which is
found first. A script run by that venv's python builds a Dashboard of a real metrics file and uses every
part of it that touches the widgets. Skipped, with pip's words, where pip cannot install it.
"""
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, sys, tempfile, warnings
    from pathlib import Path

    import ipywidgets, torch  # torch: the project's venv is seen too
    assert ipywidgets.__version__ == "7.7.1", ipywidgets.__version__
    import nsa_lib
    assert Path(nsa_lib.__file__).resolve().parents[1] == Path.cwd(), nsa_lib.__file__
    from nsa_lib.dashboard import Dashboard

    run = Path(sys.argv[1])
    records = [{"step": n, "loss": 1.0 / n, "lr": 1e-3, "temperature": 0.07, "grad_norm_mean": 1.0,
                "grad_norm_std": 0.2, "grad_norm_max": 2.0, "triplets_per_s": 50.0, "time": 1000.0 + n,
                "warnings": ["embedding collapse: 0.95"] if n == 4 else [], "skipped_total": 0}
               for n in range(1, 5)]
    records.append({"step": 4, "eval": {"sts": 0.61, "baseline_sts": 0.807}, "best_sts": 0.61, "best_step": 4})
    records.append({"step": 4, "backup": {"name": "ckpt-0000004", "ok": True, "attempts": 1, "seconds": 0.2,
                                          "error": None, "bytes": 3 * 2**20, "space_warning": "low on space"}})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in records))
    (run / "config.json").write_text(json.dumps({"max_steps": 6}))

    dash = Dashboard([run], min_interval=0.0, max_overhead=0.0, print_every=5)
    assert dash.refresh() == 6
    box = dash.widget
    assert isinstance(box, ipywidgets.VBox), type(box)
    html, image = box.children
    assert isinstance(html, ipywidgets.HTML) and isinstance(image, ipywidgets.Image)
    assert image.value[:8] == b"\\x89PNG\\r\\n\\x1a\\n" and image.format == "png"
    assert "<b>step</b> 4/6" in html.value and "ckpt-0000004 ok 3.0 MiB" in html.value
    assert "low on space" in html.value and "embedding collapse" in html.value
    dash.update({"step": 2, "resumed_from": "ckpt-0000002", "time": 5000.0})  # fed live from here on
    for n in (3, 4, 5):
        dash.update({"step": n, "loss": 0.1, "lr": 1e-3, "time": 5000.0 + n})
    assert dash.histories[0].series("loss") == ([1, 2, 3, 4, 5], [1.0, 0.5, 0.1, 0.1, 0.1])
    dash.render()
    assert dash.save_png(run / "report.png").read_bytes()[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    assert dash.show_final(run / "final.png").read_bytes()[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    live = Dashboard(total_steps=3, min_interval=0.0, max_overhead=0.0)
    box = live.widget
    for r in records:
        live.update(r)
    assert box.children[1].value[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    print("dashboard ok under ipywidgets", ipywidgets.__version__)
""")


@pytest.fixture(scope="session")
def widgets77_python(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("widgets77") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    parent = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(own) / "project-venv.pth").write_text("".join(p + "\n" for p in sorted(parent)))
    try:
        pip = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              "--retries", "1", "--timeout", "30", "ipywidgets==7.7.1"],
                             capture_output=True, text=True, timeout=300, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip("pip could not install ipywidgets==7.7.1 in 300 s (no package index reachable?)")
    if pip.returncode != 0:
        lines = [line for line in pip.stderr.splitlines() if "is ignored" not in line]  # local mirrors' noise
        pytest.skip("pip could not install ipywidgets==7.7.1 (no package index reachable?): "
                    + " / ".join(lines[-3:]))
    return python


@pytest.mark.slow
def test_dashboard_works_under_colabs_ipywidgets_7_7_1(widgets77_python, tmp_path):
    version = subprocess.run([str(widgets77_python), "-c", "import ipywidgets; print(ipywidgets.__version__)"],
                             capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    assert version == "7.7.1"
    done = subprocess.run([str(widgets77_python), "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "dashboard ok under ipywidgets 7.7.1" in done.stdout
    assert (tmp_path / "final.png").is_file()
