"""Writes the notebooks (no outputs): edit them here, then `python notebooks/generate.py` from the project root."""
import json, hashlib

BADGE = "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/spectra-nsa/spectra-nsa/blob/main/notebooks/{name}.ipynb)"

PARAMS = '''REPO_URL = "https://github.com/spectra-nsa/spectra-nsa"  #@param {type:"string"}
REF = "main"  #@param {type:"string"}
RUN_NAME = "run1"  #@param {type:"string"}'''

INSTALL = '''import os, sys
IN_COLAB = "google.colab" in sys.modules
if IN_COLAB:  # a fresh runtime: fetch the project at REF, install what Colab lacks (its torch and ipywidgets stay)
    PROJECT = "/content/spectra-nsa"
    if not os.path.isdir(f"{PROJECT}/.git"):
        !git clone -q {REPO_URL} {PROJECT} && git -C {PROJECT} checkout -q {REF}
    MARKER = f"{PROJECT}/.installed"  # written only after a complete install: an interrupted one is redone
    if not os.path.exists(MARKER):
        %pip install -q -r {PROJECT}/requirements.txt
        import accelerate, datasets, pydrive2, transformers  # noqa: F401  (stops here, marker unwritten, if pip failed)
        open(MARKER, "w").write(REF)
else:  # this repository (CI, a laptop)
    PROJECT = os.path.dirname(os.getcwd()) if os.path.basename(os.getcwd()) == "notebooks" else os.getcwd()
os.chdir(PROJECT)
sys.path.insert(0, PROJECT)
print("working in", PROJECT)'''

DRIVE = '''from nsa_lib.environment import RunPaths, mount_drive

drive, note = mount_drive()
print(note)
run = RunPaths.for_run(RUN_NAME, drive)
print("run folder:", run.folder, "| working checkpoints:", run.work)'''


MODEL_CHOICE = """**The model**: the run's `best/` (highest quick STS) or `final/` model from Drive, the other if that one
does not exist yet, else its newest checkpoint; `MODEL_FOLDER` names any other folder instead."""

LOAD_MODEL = '''from pathlib import Path
from nsa_lib.environment import detect_environment
from nsa_lib.evaluate import load_for_eval

env = detect_environment()
source = Path(MODEL_FOLDER) if MODEL_FOLDER else run.folder
model, where = load_for_eval(source, prefer=MODEL)'''


def md(text):
    return {"cell_type": "markdown", "metadata": {}, "source": text}


def code(text):
    return {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": text}


def notebook(name, cells, accelerator):
    for i, c in enumerate(cells):
        c["id"] = hashlib.sha1(f"{name}-{i}".encode()).hexdigest()[:8]
        c["source"] = c["source"].splitlines(keepends=True)
    meta = {"colab": {"provenance": []}, "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"}}
    if accelerator:
        meta = {"accelerator": "GPU", **meta}
    nb = {"cells": cells, "metadata": meta, "nbformat": 4, "nbformat_minor": 5}
    with open(f"notebooks/{name}.ipynb", "w") as f:
        json.dump(nb, f, indent=1, ensure_ascii=False)
        f.write("\n")


COMMON_INTRO = '''**Project, packages and Drive.** `REF` pins the code (a tag or commit); `RUN_NAME` is how every notebook
finds the run on Drive (`MyDrive/spectra-nsa/<RUN_NAME>/`). In Colab the first cell clones and installs
(2-3 minutes, once per runtime), then Drive is mounted.'''

setup = [
    md(f"""# Spectra-NSA · 01 · Set up
{BADGE.format(name='01_setup')}

Plans a run that finishes in the time you give it, on the hardware it finds, and says why. By default
the run is a warm start: spectral-entropy attention added to a pretrained encoder (`BASE_MODEL`,
all-MiniLM-L6-v2), which from its first step scores what that encoder scores. `BASE_MODEL = "none (from
scratch)"` trains a preset from random weights instead: the plan then times the presets that fit and
picks the largest one that still trains enough steps in `HOURS` (`PRESET` fixes one). Checks that the data can be read. Writes the plan to the run folder on Drive, where
`02_train` and `03_monitor` find it by `RUN_NAME`, each on its own runtime.

Takes 2-5 minutes (installs, then timing a few steps per preset). Run all."""),
    md(COMMON_INTRO),
    code(PARAMS + '''
HOURS = 3  #@param {type:"number"}
BASE_MODEL = "all-MiniLM-L6-v2"  #@param ["all-MiniLM-L6-v2", "bert-base-uncased", "BAAI/bge-small-en-v1.5", "intfloat/e5-small-v2", "none (from scratch)"] {allow-input: true}
PRESET = "auto"  #@param ["auto", "tiny", "mini", "M456", "M600", "M700", "M1B"]
DATA = "auto"  #@param ["auto", "msmarco", "snli"]'''),
    code(INSTALL),
    code(DRIVE),
    md("""**This machine and the data.** MS MARCO triplets stream from the Hugging Face Hub (only the rows the
run uses); without the Hub, SNLI triplets from an offline pack. STS-B (for the quick checks) and the tokenizer
likewise."""),
    code('''from nsa_lib.data import fetch_pack, hub_reachable, load_stsb, load_tokenizer
from nsa_lib.environment import base_model_name, detect_environment, plan_run

env = detect_environment()
print(env.describe())
data = DATA if DATA != "auto" else ("msmarco" if hub_reachable() and not env.smoke else "snli")
if data == "snli":
    fetch_pack("snli")
tokenizer = load_tokenizer()
print(f"training data: {data}; STS-B test pairs: {len(load_stsb('test'))}; tokenizer vocabulary {tokenizer.vocab_size}")'''),
    md("""**The plan.** A few optimizer steps are timed here (of the base model, or of each candidate preset) on
batches of the training data as the run will draw them, at its batch size and accumulation; the steps that
fit in `HOURS` follow."""),
    code('''plan = plan_run(env, HOURS, preset=None if PRESET == "auto" else PRESET, base_model=base_model_name(BASE_MODEL),
                data=data)
print(plan.reason)'''),
    md("""**The run configuration**, written to the run folder. An existing run of this name is kept as it is
(choose another `RUN_NAME` for a new run)."""),
    code('''from nsa_lib.environment import environment_dict, read_run_config, save_run_config

if run.config_file.is_file():
    settings = read_run_config(run)
    print(f"{RUN_NAME} already exists in {run.folder}: kept ({settings.get('base_model') or settings['preset']}, "
          f"{settings['max_steps']} steps)")
else:
    settings = {"run_name": RUN_NAME, "base_model": plan.base_model, "preset": plan.preset, "precision": plan.precision,
                "gradient_checkpointing": plan.gradient_checkpointing, "max_steps": plan.max_steps,
                "hours": HOURS, "plan": plan.reason, "data": data, "environment": environment_dict(env)}
    print("written to", save_run_config(run, settings))
settings'''),
]

train = [
    md(f"""# Spectra-NSA · 02 · Train
{BADGE.format(name='02_train')}

Trains the run that `01_setup` planned (found on Drive by `RUN_NAME`), with a live dashboard and a text
status line every 50 steps (kept in the notebook if the browser reconnects). On a fresh runtime, after a
disconnect too, Run all resumes from the newest checkpoint on Drive.

Interrupting the training cell saves a checkpoint, copies it to Drive and writes `final/`: nothing
finished stays only on the runtime. In CI (smoke mode) a few steps of `tiny`, through the same code."""),
    md(COMMON_INTRO),
    code(PARAMS + '''
BASE_MODEL = "all-MiniLM-L6-v2"  #@param ["all-MiniLM-L6-v2", "bert-base-uncased", "BAAI/bge-small-en-v1.5", "intfloat/e5-small-v2", "none (from scratch)"] {allow-input: true}
MAX_STEPS = 0  #@param {type:"integer"}
USE_SPECTRAL = True  #@param {type:"boolean"}
USE_ANCHOR64 = True  #@param {type:"boolean"}
USE_BRIDGE = True  #@param {type:"boolean"}
USE_MATRYOSHKA = True  #@param {type:"boolean"}
USE_ANGULAR = True  #@param {type:"boolean"}
SAVE_EVERY = 500  #@param {type:"integer"}
EVAL_EVERY = 500  #@param {type:"integer"}
BACKUP_EVERY = 3000  #@param {type:"integer"}'''),
    code(INSTALL),
    code(DRIVE),
    md("""**The run's settings**, from its folder (`MAX_STEPS = 0` keeps the plan's steps). `BASE_MODEL` is the
warm start's pretrained encoder (all-MiniLM-L6-v2 by default; `"none (from scratch)"` for a preset from
random weights): if it is not the one `01_setup` planned, a run that has not started is re-planned for it,
and a run that has started keeps its own. If this runtime's GPU is not the one the run was planned on, the
run keeps its precision, and this says what differs."""),
    code('''import os
from nsa_lib.environment import (base_model_name, detect_environment, differences_from_setup, read_run_config,
                                 settings_for_base_model, training_config)

env = detect_environment()
settings, notes = settings_for_base_model(run, read_run_config(run), env, base_model_name(BASE_MODEL))
for note in notes + differences_from_setup(settings, env):
    print("note:", note)
options = dict(max_steps=MAX_STEPS or settings["max_steps"], save_every=SAVE_EVERY, eval_every=EVAL_EVERY,
               backup_every=BACKUP_EVERY, precision=settings["precision"],
               gradient_checkpointing=settings["gradient_checkpointing"], use_spectral=USE_SPECTRAL,
               use_anchor64=USE_ANCHOR64, use_bridge=USE_BRIDGE, use_matryoshka=USE_MATRYOSHKA, use_angular=USE_ANGULAR)
if env.smoke:  # CI: a handful of steps on a slice of the data
    options.update(max_steps=int(os.environ.get("NSA_SMOKE_STEPS", 6)), save_every=3, eval_every=3, backup_every=6,
                   eval_pairs=50, max_train_samples=2000)
config = training_config(settings, **options)
start = f"warm start from {settings['base_model']}" if settings.get("base_model") else f"{config.size} from scratch"
print(f"{RUN_NAME}: {start}, {config.max_steps} steps of {config.effective_batch_size} triplets, "
      f"precision {config.precision}, data {settings['data']}")'''),
    md("""**Training.** Running this cell again frees the previous trainer first, then continues from the newest
checkpoint. Stop it at any time: the state is saved and copied to Drive."""),
    code('''import gc
from IPython.display import display
from nsa_lib.dashboard import Dashboard
from nsa_lib.trainer import Trainer

if "trainer" in globals():  # a rerun: free the previous trainer's memory (GPU included) and its run folder
    trainer.close()
    del trainer
    gc.collect()
dashboard = Dashboard(total_steps=config.max_steps, min_interval=0 if env.smoke else 5, name=RUN_NAME,
                      print_every=1 if env.smoke else 50)
display(dashboard.widget)
trainer = Trainer(config, data=settings["data"], output_dir=run.folder, checkpoint_dir=run.work, resume="auto",
                  backup=str(run.backups), callbacks=(dashboard.update,), show_progress=False,
                  init_from=settings.get("base_model"))
try:
    state = trainer.train()
finally:  # also when interrupted: the figure goes to Drive and stays in this notebook
    dashboard.show_final(run.folder / "dashboard.png")
print(f"step {state.step}, skipped {state.skipped}, best quick STS {state.best_sts:.4f} at step {state.best_step}")
print("final model:", trainer.final_dir, "| best model:", run.folder / "best")'''),
]

monitor = [
    md(f"""# Spectra-NSA · 03 · Monitor
{BADGE.format(name='03_monitor')}

Follows a run from its folder on Drive while it trains in `02_train` on another runtime (or after it
finished): the dashboard refreshed every few seconds, the health warnings over time, and the quick STS
checks next to the baseline (all-MiniLM-L6-v2 on the same pairs) and the preset's target. Other runs
(`EXTRA_RUNS`, by name) are overlaid, e.g. an ablation. A CPU runtime is enough.

Runs as long as you let the refresh loop run (CI: one refresh)."""),
    md(COMMON_INTRO),
    code(PARAMS + '''
EXTRA_RUNS = ""  #@param {type:"string"}
REFRESH_SECONDS = 10  #@param {type:"integer"}
REFRESHES = 30  #@param {type:"integer"}'''),
    code(INSTALL),
    code(DRIVE),
    code('''from IPython.display import display
from nsa_lib.dashboard import Dashboard

runs = [run.folder] + [RunPaths.for_run(name.strip(), drive).folder for name in EXTRA_RUNS.split(",") if name.strip()]
dashboard = Dashboard(runs)
dashboard.refresh()
display(dashboard.widget)'''),
    md("""**Health over time**: the steps that raised warnings, and the quick STS checks against the baseline and target."""),
    code('''from IPython.display import HTML

history = dashboard.histories[0]
flagged = [(r["step"], w) for r in history.steps for w in r.get("warnings", [])]
rows = "".join(f"<tr><td>{s}</td><td>{w}</td></tr>" for s, w in flagged[-20:]) or "<tr><td colspan=2>no warnings</td></tr>"
display(HTML(f"<b>health warnings</b><table><tr><th>step</th><th>warning</th></tr>{rows}</table>"))
evals = "".join(f"<tr><td>{r['step']}</td><td>{r['eval']['sts']:.4f}</td><td>{r['eval'].get('baseline_sts', float('nan')):.4f}</td>"
                f"<td>{r['eval'].get('target_sts', float('nan')):.3f}</td></tr>" for r in history.evals)
display(HTML(f"<b>quick STS-B</b><table><tr><th>step</th><th>Spectra-NSA</th><th>all-MiniLM-L6-v2</th><th>target</th></tr>{evals}</table>"))'''),
    md("""**Auto-refresh**: follows the run while it trains (stop the cell to stop following); the last figure stays
in the notebook."""),
    code('''import time
from nsa_lib.environment import detect_environment

smoke = detect_environment().smoke
for _ in range(1 if smoke else REFRESHES):
    time.sleep(0 if smoke else REFRESH_SECONDS)
    dashboard.refresh()
dashboard.show_final()
print("last step seen:", dashboard.status()["step"])'''),
]

evaluate = [
    md(f"""# Spectra-NSA · 04 · Evaluate
{BADGE.format(name='04_evaluate')}

Evaluates a run's model (found on Drive by `RUN_NAME`, or any local folder) on every task, side by side
with the baseline a user would otherwise pick (all-MiniLM-L6-v2, measured live): STS-B for every output and
Matryoshka dim (SICK-R and STS12-16 when the Hub is reachable), retrieval (held-out triplets, SNLI test,
NanoMSMARCO), clustering, the Matryoshka curve, out-of-distribution detection against WordNet glosses
(SPEC's `anomaly_score`, and the fitted detector's `ood_score` that every trained model carries), and the
spectral entropy. Results go to the run folder (`eval/`). An optional last section
trains the ablation variants on one budget and compares them.

Takes 10-20 minutes on a CPU runtime for a MiniLM-sized model and the baseline (a GPU: a few minutes);
the ablation, when switched on, as long as its training. In CI (smoke mode) a few texts per task."""),
    md(COMMON_INTRO),
    code(PARAMS + '''
MODEL = "best"  #@param ["best", "final"]
MODEL_FOLDER = ""  #@param {type:"string"}
TASKS = "all"  #@param {type:"string"}
COMPARE_BASELINE = True  #@param {type:"boolean"}
RUN_ABLATION = False  #@param {type:"boolean"}
ABLATION_STEPS = 300  #@param {type:"integer"}'''),
    code(INSTALL),
    code(DRIVE),
    md(MODEL_CHOICE),
    code(LOAD_MODEL + '''

import torch

tokenizer = model.tokenizer  # the one saved with the model
if torch.cuda.is_available():
    model = model.cuda()
print(f"{where}: {model.num_parameters() / 1e6:.1f}M parameters, hidden {model.config.hidden_size}, "
      f"{model.config.num_layers} layers ({'BERT block' if model.config.architecture == 'bert' else 'preset ' + model.config.size})")'''),
    md("""**Evaluation**, with a progress bar over the tasks; the baseline runs the same tasks (those it has an
output for). The table, the figures and `results.json` are written to the run folder's `eval/`."""),
    code('''from nsa_lib.evaluate import baseline_encoder, encoder_subject, evaluate, model_subject
from nsa_lib.report import markdown_table, write_report

limit = 40 if env.smoke else None  # CI: a few texts per task, the same code
results = {"Spectra-NSA": evaluate(model_subject(model, tokenizer), TASKS, limit=limit)}
if COMPARE_BASELINE:
    results["all-MiniLM-L6-v2"] = evaluate(encoder_subject(baseline_encoder()), TASKS, limit=limit)
out = source / "eval"
written = write_report(results, out, title=f"Evaluation of {where}")
print("written:", ", ".join(p.name for p in written.values()), "to", out)'''),
    md("""**Results**: one row per task and metric (the headline output: `embedding_semantic` for STS,
`embedding_ranking` for retrieval), then every output and Matryoshka dim."""),
    code('''from IPython.display import Image, Markdown, display

display(Markdown(markdown_table(results)))'''),
    md("""**Per task against the baseline**, **the Matryoshka curve** (STS-B test over the dims, and how well each
dim keeps the largest one's ranking) and **anomaly scores** (`anomaly_score`, and
`ood_score` where the model has an OOD detector), in-domain (SNLI test) against out-of-domain (WordNet glosses)."""),
    code('''for name in ("tasks", "matryoshka", "anomaly"):
    if name in written:
        display(Image(filename=str(written[name])))'''),
    md("""**Try it**: rank your own sentences against a query (cosine of `embedding_semantic`)."""),
    code('''QUERY = "A man is playing a guitar on stage."  #@param {type:"string"}
SENTENCES = ["Someone performs music for a crowd.", "A woman is slicing vegetables.",
             "The musician tunes his instrument.", "Two dogs run across a field."]
from nsa_lib.evaluate import encode

vectors = encode(model, tokenizer, [QUERY] + SENTENCES)
for score, sentence in sorted(zip((vectors[1:] @ vectors[0]).tolist(), SENTENCES), reverse=True):
    print(f"{score:+.3f}  {sentence}")'''),
    md("""**Ablation** (`RUN_ABLATION`): the same budget (`ABLATION_STEPS`) with the full model and with each
component off (`no-spectral`, `no-anchor64`, `no-bridge`, `no-matry`, `no-angular`), each evaluated the same
way, into the run folder's `ablation/`. It resumes: a variant already trained and evaluated is read back,
so a reconnect loses at most the variant in progress. Each variant trains for about as long as
`ABLATION_STEPS` steps take (see `02_train`)."""),
    code('''from nsa_lib import NSAConfig
from nsa_lib.ablation import run_ablation
from nsa_lib.environment import read_run_config
from nsa_lib.report import ablation_table

if RUN_ABLATION or env.smoke:
    settings = read_run_config(run) if run.config_file.is_file() else {}
    base = settings.get("base_model")
    if env.smoke:  # CI: two variants, two steps each
        config, base, variants, steps = NSAConfig.from_preset("tiny"), None, "full,no-spectral", 2
    else:
        from nsa_lib.warmstart import encoder_config
        config = encoder_config(base) if base else NSAConfig.from_preset(settings.get("preset", "mini"))
        variants, steps = "all", ABLATION_STEPS
    config = NSAConfig.from_dict({**config.to_dict(), "max_steps": steps, "save_every": max(1, steps // 4),
                                  "eval_every": max(1, steps // 2), "backup_every": 0})
    ablation = run_ablation(config, run.folder / "ablation", data=settings.get("data", "snli"), init_from=base,
                            variants=variants, tasks="stsb,retrieval,clustering" if not env.smoke else "stsb",
                            limit=limit, overwrite=env.smoke)  # CI: a fresh ablation every run
    display(Markdown(ablation_table(ablation)))
    display(Image(filename=str(run.folder / "ablation" / "report" / "tasks.png")))'''),
]

export = [
    md(f"""# Spectra-NSA · 05 · Export
{BADGE.format(name='05_export')}

Exports a run's model (found on Drive by `RUN_NAME`, or any local folder) where people already use
sentence encoders: a transformers folder (`hf`), a sentence-transformers folder, ONNX, and ONNX with int8
weights, each with its tokenizer and a model card. Every export is checked here against the PyTorch model
it came from, and the int8 model is scored on STS-B test next to the float one. The exports go to the run
folder's `export/` on Drive; an optional last step uploads the sentence-transformers folder to the
Hugging Face Hub.

Takes 1-2 minutes on a CPU runtime for a MiniLM-sized model (most of it the int8 STS-B scores). In CI
(smoke mode) the same exports without the STS-B scores."""),
    md(COMMON_INTRO),
    code(PARAMS + '''
MODEL = "best"  #@param ["best", "final"]
MODEL_FOLDER = ""  #@param {type:"string"}
FORMATS = "hf,sentence-transformers,onnx,int8"  #@param {type:"string"}
OUTPUT_KEY = "embedding_semantic"  #@param {type:"string"}
PUSH_TO_HUB = False  #@param {type:"boolean"}
HUB_REPO_ID = ""  #@param {type:"string"}
HUB_PRIVATE = True  #@param {type:"boolean"}'''),
    code(INSTALL),
    code(DRIVE),
    md(MODEL_CHOICE),
    code(LOAD_MODEL + '''
print(f"{where}: {model.num_parameters() / 1e6:.1f}M parameters, hidden {model.config.hidden_size}, "
      f"{model.config.num_layers} layers ({'BERT block' if model.config.architecture == 'bert' else 'preset ' + model.config.size}), "
      f"Matryoshka widths {model.config.sem_dims}")'''),
    md("""**Export**, one folder per format in `FORMATS`, into the run folder's `export/` (an earlier export of
the same format is replaced). `OUTPUT_KEY` is what the `hf` and sentence-transformers folders return by
default (`embedding_semantic` at its largest width); the ONNX graphs hold every output. Each export is
checked in this process: ONNX against PyTorch on a padded batch, the sentence-transformers folder against
`model.encode`; the int8 one is scored on STS-B test, float and int8 ONNX side by side. The same from a
terminal, one format at a time:

    python -m nsa_lib export --checkpoint DIR --format onnx --output OUT"""),
    code('''from nsa_lib.export import export

out = source / "export"
reports = {}
for fmt in [f.strip() for f in FORMATS.split(",") if f.strip()]:
    # CI: no STS-B scores (1,379 pairs per model), the same exports and checks
    reports[fmt] = export(where, fmt, out / fmt, output_key=OUTPUT_KEY, prefer=MODEL, overwrite=True,
                          stsb=False if env.smoke else None)
    print(reports[fmt].summary())'''),
    md("""**What was written**: each folder's size, its largest difference to PyTorch (over every output for ONNX,
on the embedding for the others; for int8, where every activation moves a little by design, the smallest
cosine between its embedding and PyTorch's instead), and the STS-B test scores where measured (Spearman).
Each folder's `export.json` holds the same."""),
    code('''from IPython.display import Markdown, display

rows = ["| format | folder | size (MiB) | agreement with PyTorch | STS-B test (Spearman) |", "|---|---|---:|---:|---|"]
for fmt, report in reports.items():
    parity = ("-" if report.parity is None else f"max abs. difference {report.parity:.1e}") if report.min_cosine is None \
        else f"cosine ≥ {report.min_cosine:.4f}"
    stsb = ", ".join(f"{name} {score:.4f}" for name, score in report.stsb_test.items()) or "-"
    rows.append(f"| {fmt} | `{report.path}` | {report.bytes / 2**20:.1f} | {parity} | {stsb} |")
display(Markdown("\\n".join(rows)))
if "int8" in reports:
    sizes = reports["int8"].sizes
    print(f"model.onnx: fp32 {sizes['onnx_fp32'] / 2**20:.1f} MiB, int8 {sizes['onnx_int8'] / 2**20:.1f} MiB "
          f"({sizes['onnx_fp32'] / sizes['onnx_int8']:.1f}x smaller)")'''),
    md("""**The model card** (README.md in each folder, shown here from the sentence-transformers one): the model,
its training and evaluation when the run folder has them (`04_evaluate` writes `eval/results.md`), and how
to load it."""),
    code('''card = out / ("sentence-transformers" if "sentence-transformers" in reports else next(iter(reports))) / "README.md"
text = card.read_text()
display(Markdown(text.split("---", 2)[2] if text.startswith("---") else text))  # without the Hub's metadata header'''),
    md("""**Check as a user would**: the sentence-transformers folder through `SentenceTransformer` and the ONNX
folders through onnxruntime (`nsa_lib.export.OnnxEncoder`), next to `model.encode`; the cosine
similarities of a few sentences should agree (int8 to about two decimals)."""),
    code('''from sentence_transformers import SentenceTransformer
from nsa_lib.export import OnnxEncoder

SENTENCES = ["A man is playing a guitar.", "Someone is making music.", "A woman is slicing an onion."]
vectors = {"model.encode": model.encode(SENTENCES, OUTPUT_KEY)}
if "sentence-transformers" in reports:
    loaded = SentenceTransformer(str(out / "sentence-transformers"), trust_remote_code=True, device="cpu")
    vectors["SentenceTransformer"] = loaded.encode(SENTENCES, normalize_embeddings=True)
for fmt in ("onnx", "int8"):
    if fmt in reports:
        vectors[f"onnxruntime {fmt}"] = OnnxEncoder(out / fmt, OUTPUT_KEY)(SENTENCES).numpy()
pairs = [(0, 1), (0, 2), (1, 2)]
rows = ["| pair | " + " | ".join(vectors) + " |", "|---|" + "---:|" * len(vectors)]
for i, j in pairs:
    rows.append(f"| {SENTENCES[i]} / {SENTENCES[j]} | " + " | ".join(f"{v[i] @ v[j]:.4f}" for v in vectors.values()) + " |")
display(Markdown("\\n".join(rows)))'''),
    md("""**The Hub** (`PUSH_TO_HUB`): uploads the sentence-transformers folder to `HUB_REPO_ID` (e.g.
`your-name/spectra-nsa-minilm`, created if missing, private if `HUB_PRIVATE`); its model card then names
that repository. Log in first with a token that can write: in Colab the prompt below, or a Colab secret
named `HF_TOKEN` (the key icon on the left), which needs no prompt. Off by default (and in CI)."""),
    code('''if PUSH_TO_HUB and IN_COLAB and not env.smoke:
    from huggingface_hub import notebook_login

    notebook_login()  # skipped when already logged in (an HF_TOKEN secret)'''),
    code('''from huggingface_hub import get_token
from nsa_lib.export import push_to_hub

if not PUSH_TO_HUB or env.smoke:
    print("not pushed: PUSH_TO_HUB is off" if not PUSH_TO_HUB else "not pushed: CI smoke mode")
elif not HUB_REPO_ID:
    print("not pushed: HUB_REPO_ID is empty; give the repository to create or update, e.g. your-name/spectra-nsa-minilm")
elif "sentence-transformers" not in reports:
    print("not pushed: add sentence-transformers to FORMATS (the folder that is uploaded)")
elif get_token() is None:
    print("not pushed: not logged in to the Hub; log in above (or add an HF_TOKEN secret), then run this cell again")
else:
    url = push_to_hub(out / "sentence-transformers", HUB_REPO_ID, private=HUB_PRIVATE)
    print(f"pushed to https://huggingface.co/{HUB_REPO_ID} ({'private' if HUB_PRIVATE else 'public'}): {url}")'''),
]

notebook("01_setup", setup, accelerator=True)
notebook("02_train", train, accelerator=True)
notebook("03_monitor", monitor, accelerator=False)
notebook("04_evaluate", evaluate, accelerator=False)
notebook("05_export", export, accelerator=False)
