"""The dashboard seen in a real browser: Jupyter on localhost serves a notebook that builds the dashboard
of a real (tiny) run, headless Chromium (Debian's, driven by Playwright; no browser download) runs it, and
the widgets and the plot must actually render. The screenshot is kept under the test's temp folder (and
copied to $NSA_SCREENSHOT_DIR when set)."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from nsa_lib import NSAConfig
from nsa_lib.data import load_snli_triplets, load_tokenizer
from nsa_lib.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {seconds} s")


@pytest.mark.slow
def test_dashboard_renders_in_headless_chromium(tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (setup.sh installs it where apt-get can)")
    pytest.importorskip("jupyterlab")
    playwright = pytest.importorskip("playwright.sync_api")

    run = tmp_path / "run"
    config = NSAConfig.from_preset("tiny", batch_train=8, max_steps=6, eval_every=3, save_every=0, max_length=32)
    Trainer(config, output_dir=run, tokenizer=load_tokenizer(source="offline"),
            triplets=load_snli_triplets("train")[:400], show_progress=False,
            eval_fn=lambda model, tok: {"sts": 0.5, "baseline_sts": 0.807}).train()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "from nsa_lib.dashboard import Dashboard\n"
        f"dashboard = Dashboard([{str(run)!r}])\n"
        "dashboard.refresh()\n"
        "dashboard.widget")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "dashboard.ipynb")

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", f"--port={port}", "--ip=127.0.0.1",
         "--ServerApp.token=", "--ServerApp.password=", "--ServerApp.disable_check_xsrf=True",
         f"--ServerApp.root_dir={tmp_path}", "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "jupyter.log", "w"), env={**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "jcfg")})
    try:
        wait_for(f"http://127.0.0.1:{port}/api", 120)
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(f"http://127.0.0.1:{port}/lab/tree/dashboard.ipynb", timeout=120_000)
            page.wait_for_selector(".jp-Notebook", timeout=120_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
            page.wait_for_timeout(3000)  # let the kernel connection settle
            page.click(".jp-Cell .jp-InputArea-editor")
            page.keyboard.press("Shift+Enter")
            page.wait_for_timeout(2000)
            page.screenshot(path=str(tmp_path / "after-run.png"))
            image = page.wait_for_selector(".jp-OutputArea-output img", timeout=180_000)  # the Image widget
            page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=image, timeout=60_000)
            html = page.inner_text(".jp-OutputArea-output")  # the HTML widget above it
            size = image.evaluate("el => [el.naturalWidth, el.naturalHeight]")
            shot = tmp_path / "dashboard-in-chromium.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert "step 6" in " ".join(html.split()) and "health warnings" in html
    assert size[0] > 800 and size[1] > 400  # the matplotlib figure, decoded by the browser
    assert shot.stat().st_size > 20_000
    if os.environ.get("NSA_SCREENSHOT_DIR"):
        Path(os.environ["NSA_SCREENSHOT_DIR"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["NSA_SCREENSHOT_DIR"]) / shot.name)
