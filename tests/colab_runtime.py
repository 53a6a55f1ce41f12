"""Run one notebook the way a Colab runtime runs it: started as its own process (from a fresh copy of the
repository, with its own HOME), its cells executed in order by a Jupyter kernel until one fails or is
interrupted, the executed notebook written out. Used by tests/test_colab_runtimes.py.

    python tests/colab_runtime.py NOTEBOOK OUT [--set NAME=VALUE ...] [--interrupt-after-steps N --metrics FILE]

--set replaces a form field's value (`RUN_NAME = "run1"  #@param ...` -> `RUN_NAME = "ref"  #@param ...`),
as a user edits the form. --interrupt-after-steps interrupts the kernel (Colab's stop button: a
KeyboardInterrupt in the running cell) once FILE holds N optimizer-step records. Exit code 0 if every
cell ran, 3 if the run was interrupted, 1 if a cell failed.
"""
import argparse
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def set_fields(nb, fields: dict[str, str]) -> None:
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for name, value in fields.items():
            cell.source = re.sub(rf"^{name} = [^#\n]*(#@param.*)?$", lambda m: f"{name} = {value}  {m.group(1) or ''}",
                                 cell.source, flags=re.M)


def steps_in(path: Path) -> int:
    if not path.is_file():
        return 0
    return sum('"loss"' in line for line in path.read_text().splitlines())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("notebook")
    p.add_argument("out")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--interrupt-after-steps", type=int)
    p.add_argument("--metrics")
    args = p.parse_args()
    nb = nbformat.read(args.notebook, as_version=4)
    set_fields(nb, dict(item.split("=", 1) for item in args.set))
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(Path(args.notebook).parent)}})
    outcome = {"failed": None}

    def run_cells():
        try:
            for index, cell in enumerate(nb.cells):
                client.execute_cell(cell, index)
        except CellExecutionError as e:
            outcome["failed"] = str(e)[-3000:]

    interrupted = False
    with client.setup_kernel():
        worker = threading.Thread(target=run_cells)
        worker.start()
        while worker.is_alive():
            if args.interrupt_after_steps and not interrupted and \
                    steps_in(Path(args.metrics)) >= args.interrupt_after_steps:
                os.kill(client.km.provisioner.process.pid, signal.SIGINT)  # what interrupt_kernel sends
                interrupted = True
            time.sleep(0.02)
        worker.join()
    nbformat.write(nb, args.out)
    if interrupted:
        print(json.dumps({"interrupted": True, "error": outcome["failed"]}))
        return 3 if outcome["failed"] and "KeyboardInterrupt" in outcome["failed"] else 1
    if outcome["failed"]:
        print(outcome["failed"], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
