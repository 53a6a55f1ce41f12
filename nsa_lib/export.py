"""Export a trained model where people already work: transformers, sentence-transformers, ONNX, INT8 ONNX,
and the Hugging Face Hub.

    python -m nsa_lib export --checkpoint runs/warm15 --format onnx --output exports/onnx

Formats (`FORMATS`); each folder also holds the tokenizer, a model card (README.md) and export.json (what
was exported, its size and the checks below):

- `hf`: config.json (with `auto_map`), model.safetensors and the modelling code (nsa_lib.hf_model and
  the modules it imports), so that `AutoModel.from_pretrained(dir, trust_remote_code=True)` loads it
  where nsa_lib is not installed.
- `sentence-transformers`: the `hf` folder plus modules.json: `SentenceTransformer(dir,
  trust_remote_code=True).encode(texts)` returns our `encode(texts)` (the chosen output, default
  `embedding_semantic` at its largest width; `truncate_dim` gives the Matryoshka widths).
- `onnx`: model.onnx (opset ≥ 17; inputs `input_ids`, `attention_mask`, dynamic batch and sequence axes),
  the pooling and every head inside the graph, one named output per embedding (`ONNX outputs`: e.g.
  `embedding_semantic_768`, `anomaly_score`). Checked against PyTorch with onnxruntime on a padded batch.
- `int8`: the ONNX model with its weights quantised to int8 (onnxruntime's dynamic quantisation), its
  STS-B test score next to the float model's.

Every export is written to a temporary folder next to `output` and renamed into place when complete.
Not handled here: TorchScript (the ONNX graph serves the same need), fp16 ONNX, token-type inputs.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .model import NSAModel, embedding_keys, length_order, pick_output

FORMATS = ("hf", "sentence-transformers", "onnx", "int8")
ONNX_OPSET = 17
ONNX_FILE = "model.onnx"
ONNX_INFO = "onnx_outputs.json"
REPORT_FILE = "export.json"
# a padded batch of real sentences of different lengths, for the parity checks
PARITY_SENTENCES = (
    "A man is playing a guitar.",
    "A woman is slicing an onion on a wooden cutting board in a small kitchen.",
    "Dogs run.",
    "The stock market fell sharply on Tuesday after the central bank raised interest rates again.",
    "Two children are playing soccer in a park while their parents watch from a bench nearby.",
    "It is raining.",
    "A plane is taking off.",
    "The committee postponed its decision on the new budget until next month's meeting.",
)


@dataclass
class ExportReport:
    """What `export` wrote: the folder, its format and size, and the checks run on it (`parity`: the
    largest absolute difference to PyTorch over every output; `stsb_test`: Spearman per model)."""

    format: str
    path: str
    bytes: int
    source: str
    parity: float | None = None
    min_cosine: float | None = None
    stsb_test: dict[str, float] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{self.format}: {self.path} ({self.bytes / 2**20:.1f} MiB)"]
        if self.parity is not None:
            parts.append(f"max |difference| to PyTorch {self.parity:.2e}")
        if self.min_cosine is not None:
            parts.append(f"cosine to PyTorch's embedding ≥ {self.min_cosine:.4f}")
        if self.stsb_test:
            parts.append("STS-B test " + ", ".join(f"{k} {v:.4f}" for k, v in self.stsb_test.items()))
        return "; ".join(parts)


# ONNX


def onnx_output_names(model: NSAModel) -> list[str]:
    """The ONNX graph's outputs, in order: every embedding (`embedding_keys`, a Matryoshka width spelled
    `<key>_<dim>`), then `anomalous`, `spectral`, `anomaly_score`, `ood_score` (if the model has a fitted OOD
    detector) and `pooled`. `last_hidden_state` is left out."""
    return [key.replace("@", "_") for key in _graph_keys(model)]


def _graph_keys(model: NSAModel) -> list[str]:
    ood = ["ood_score"] if model.ood is not None else []
    return embedding_keys(model.config) + ["anomalous", "spectral", "anomaly_score", *ood, "pooled"]


class OnnxGraph(nn.Module):
    """NSAModel as the ONNX graph sees it: (input_ids, attention_mask) -> the outputs of
    `onnx_output_names`, padding always masked (an all-ones mask gives what no mask gives)."""

    def __init__(self, model: NSAModel):
        super().__init__()
        self.model = model
        self.keys = _graph_keys(model)
        self.names = onnx_output_names(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.forward_checked(input_ids, attention_mask.ne(0))
        return tuple(pick_output(out, name, int(dim) if dim else None)
                     for name, _, dim in (key.partition("@") for key in self.keys))


def export_onnx(model: NSAModel, path: str | Path, *, opset: int = ONNX_OPSET) -> Path:
    """Write `model` as one ONNX file at `path` (TorchScript-based exporter, dynamic batch and sequence
    axes) and its output names next to it in onnx_outputs.json."""
    if opset < 17:
        raise ValueError(f"opset {opset}: the export needs opset 17 or later (LayerNormalization)")
    path = Path(path)
    graph = OnnxGraph(model).eval()
    # an example shorter than every sequence-length switch in the model (the traced branch computes the
    # same function at every length)
    example = model.tokenizer(list(PARITY_SENTENCES[:3]), padding=True, return_tensors="pt")
    dynamic = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    dynamic.update({name: {0: "batch"} for name in graph.names})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on the shape switches named above
        torch.onnx.export(graph, (example["input_ids"], example["attention_mask"]), str(path), dynamo=False,
                          opset_version=opset, input_names=["input_ids", "attention_mask"],
                          output_names=graph.names, dynamic_axes=dynamic, do_constant_folding=True)
    (path.parent / ONNX_INFO).write_text(json.dumps({"outputs": graph.names, "opset": opset,
                                                      "max_length": model.config.max_length}, indent=1))
    return path


class OnnxEncoder:
    """Sentences -> embeddings with onnxruntime: `encoder(texts)` gives the `output` embedding (L2-
    normalised, a (N, D) float32 tensor, as `NSAModel.encode`), `encoder.run(texts)` every output.

    Args:
        folder: an `onnx` or `int8` export (model.onnx, onnx_outputs.json, the tokenizer).
        output: an ONNX output name (`embedding_semantic_256`) or an output key (`embedding_ranking`;
            a Matryoshka key means its largest width); default `embedding_semantic`.
    """

    def __init__(self, folder: str | Path, output: str | None = None, *, batch_size: int = 64):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        folder = Path(folder)
        info = json.loads((folder / ONNX_INFO).read_text())
        self.names, self.max_length = info["outputs"], info["max_length"]
        output = output or "embedding_semantic"
        matches = [n for n in self.names if n == output or n.startswith(f"{output}_") and n[len(output) + 1:].isdigit()]
        if not matches:
            raise KeyError(f"no ONNX output {output!r}; outputs: {self.names}")
        self.output = matches[0]  # an exact name, else the key's largest width (listed first)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(folder / ONNX_FILE), options, providers=["CPUExecutionProvider"])
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.batch_size = batch_size

    def run(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="np")
        values = self.session.run(None, {"input_ids": enc["input_ids"].astype(np.int64),
                                         "attention_mask": enc["attention_mask"].astype(np.int64)})
        return dict(zip(self.names, values))

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        order, restore = length_order(texts)
        parts = [self.run([texts[i] for i in order[s:s + self.batch_size]])[self.output]
                 for s in range(0, len(order), self.batch_size)]
        return torch.nn.functional.normalize(torch.from_numpy(np.concatenate(parts)).float()[restore], dim=-1)


def onnx_parity(model: NSAModel, folder: str | Path, texts: Sequence[str] = PARITY_SENTENCES,
                names: Sequence[str] | None = None) -> float:
    """Largest absolute difference between the ONNX export in `folder` and `model` over the outputs `names`
    (default every output), on one padded batch of `texts`."""
    onnx_out = OnnxEncoder(folder).run(texts)
    onnx_out = {name: onnx_out[name] for name in (names or onnx_out)}
    batch = model.tokenizer(list(texts), padding=True, truncation=True, max_length=model.config.max_length,
                            return_tensors="pt")
    with torch.no_grad():
        ref = dict(zip(onnx_output_names(model), OnnxGraph(model.eval())(batch["input_ids"], batch["attention_mask"])))
    return max(float(np.abs(ref[name].numpy() - onnx_out[name]).max()) for name in onnx_out)


def onnx_min_cosine(model: NSAModel, folder: str | Path, output: str = "embedding_semantic",
                    texts: Sequence[str] = PARITY_SENTENCES) -> float:
    """The smallest cosine, over `texts`, between the ONNX export's `output` embedding and PyTorch's."""
    theirs = OnnxEncoder(folder, output)(list(texts))
    ours = torch.from_numpy(model.encode(list(texts), output))
    return float((theirs * ours).sum(-1).min())


def quantize_int8(onnx_path: str | Path, out_path: str | Path) -> Path:
    """onnxruntime's dynamic quantisation: weights of the MatMul/Gemm nodes to int8, activations quantised
    on the fly, except the OOD detector's whitening (`/ood/` nodes: the Mahalanobis distance magnifies the
    error of its low-variance directions; kept in float it halves the int8 export's mean |ood_score| error,
    0.115 to 0.043 on the 15-minute warm start). Returns `out_path`."""
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    keep_float = [node.name for node in graph.node if node.name.startswith("/ood/")]

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its notes on pre-processing and on the integer tensors it leaves alone
    try:
        quantize_dynamic(str(onnx_path), str(out_path), weight_type=QuantType.QInt8, nodes_to_exclude=keep_float)
    finally:
        root.setLevel(level)
    return Path(out_path)


# the model card


def model_card(model: NSAModel, source: Path | None, fmt: str, *, repo_id: str | None = None) -> str:
    """README.md of an export: what the model is, its config, its training data and steps (from the run
    folder, when there is one), its evaluation table (a `python -m nsa_lib eval --output-dir` results.md
    in the run folder's eval/ or the model folder), and a usage snippet for each format."""
    c = model.config
    run = _run_folder(source)
    training = _training_facts(run, source)
    name = repo_id or "path/to/this/folder"
    warm = c.architecture == "bert"
    base = c.tokenizer if warm else None
    lines = ["---", "license: apache-2.0", "library_name: sentence-transformers" if fmt == "sentence-transformers"
             else ("library_name: transformers" if fmt == "hf" else "library_name: onnx"),
             "pipeline_tag: sentence-similarity",
             "tags:", "- sentence-transformers", "- sentence-similarity", "- feature-extraction", "- spectra-nsa"]
    if base:
        lines.append(f"base_model: {_hub_name(base)}")
    lines += ["---", "", "# Spectra-NSA sentence encoder", "",
              "A sentence-embedding model with spectral-entropy attention (softmax attention with a learned "
              "fractal term and a sigmoid spectral side path), Matryoshka embeddings and an anomaly head, "
              "trained with nsa_lib" + (f", warm-started from `{base}`." if base else " from random weights."),
              "", "## Model", "",
              "| setting | value |", "|---|---|",
              f"| parameters | {model.num_parameters():,} |",
              f"| layers × hidden × heads | {c.num_layers} × {c.hidden_size} × {c.num_heads} |",
              f"| pooling | {c.pooling} |",
              f"| max tokens | {c.max_length} |",
              f"| semantic (Matryoshka) widths | {', '.join(map(str, c.sem_dims))} |",
              f"| spectral path | {'on' if c.use_spectral else 'off'} (spectral_dim {c.spectral_dim}) |",
              f"| format of this folder | {fmt} |", ""]
    if training:
        lines += ["## Training", "", *[f"- {k}: {v}" for k, v in training.items()], ""]
    table = _evaluation_table(run, source)
    if table:
        lines += ["## Evaluation", "", table.strip(), ""]
    lines += ["## Usage", ""] + _usage(fmt, name, c.sem_dims[-1])
    return "\n".join(lines) + "\n"


def _hub_name(name: str) -> str:
    return name if "/" in name else f"sentence-transformers/{name}"


def _run_folder(source: Path | None) -> Path | None:
    if source is None:
        return None
    for folder in (source, source.parent, source.parent.parent):
        if (folder / "metrics.jsonl").is_file() or (folder / "config.json").is_file() and (folder / "final").is_dir():
            return folder
    return None


def _training_facts(run: Path | None, source: Path | None) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    if run is not None and (run / "run_config.json").is_file():  # the notebooks' run settings
        facts["data"] = json.loads((run / "run_config.json").read_text()).get("data")
    if source is not None:
        for marker in ("final.json", "best.json"):
            if (source / marker).is_file():
                info = json.loads((source / marker).read_text())
                facts["data"] = facts.get("data") or info.get("data")  # runs before 0.2.0's export: not recorded
                facts["optimizer steps"] = info.get("step")
                if "sts" in info:
                    facts["quick STS when saved"] = round(info["sts"], 4)
    if run is not None and (run / "config.json").is_file():
        cfg = json.loads((run / "config.json").read_text())
        facts["triplets per step"] = cfg.get("batch_train", 0) * cfg.get("grad_accum", 1)
        facts["learning rate"] = (f"{cfg.get('lr')} (new parts), {cfg.get('backbone_lr')} (pretrained weights)"
                                  if cfg.get("backbone_lr") else cfg.get("lr"))
    if run is not None and (run / "metrics.jsonl").is_file():
        times = [json.loads(line)["time"] for line in (run / "metrics.jsonl").read_text().splitlines()
                 if line.strip() and '"loss"' in line]
        if len(times) > 1:
            seconds = times[-1] - times[0]
            facts["training time"] = f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
    return {k: v for k, v in facts.items() if v is not None}


def _evaluation_table(run: Path | None, source: Path | None) -> str | None:
    for folder in [p for p in (source, run) if p is not None]:
        for candidate in (folder / "results.md", folder / "eval" / "results.md"):
            if candidate.is_file():
                text = candidate.read_text()
                return "\n".join(line for line in text.splitlines() if not line.startswith("# "))
    return None


def _usage(fmt: str, name: str, small: int) -> list[str]:
    st = ["```python", "from sentence_transformers import SentenceTransformer", "",
          f'model = SentenceTransformer("{name}", trust_remote_code=True)  # truncate_dim={small} for a Matryoshka width',
          'vectors = model.encode(["A man is playing a guitar.", "Someone makes music."], normalize_embeddings=True)',
          "print(vectors @ vectors.T)", "```"]
    hf = ["```python", "from transformers import AutoModel, AutoTokenizer", "",
          f'model = AutoModel.from_pretrained("{name}", trust_remote_code=True).eval()',
          f'tokenizer = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)',
          'batch = tokenizer(["A man is playing a guitar."], padding=True, return_tensors="pt")',
          "out = model(**batch)",
          "out.pooler_output          # embedding_semantic at its largest width, L2-normalised",
          f'out.embeddings["anomaly_score"], out.embeddings["embedding_semantic"][{small}]', "```"]
    onnx = ["```python", "import numpy as np, onnxruntime as ort", "from transformers import AutoTokenizer", "",
            f'session = ort.InferenceSession("{name}/model.onnx")',
            f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
            'batch = tokenizer(["A man is playing a guitar."], padding=True, return_tensors="np")',
            'outputs = session.run(None, {"input_ids": batch["input_ids"].astype(np.int64),',
            '                             "attention_mask": batch["attention_mask"].astype(np.int64)})',
            "names = [o.name for o in session.get_outputs()]   # embedding_semantic_768, ..., anomaly_score",
            "```"]
    nsa = ["```python", "import nsa_lib", "",
           f'vectors = nsa_lib.encode("{name}", ["A man is playing a guitar."], dim={small})', "```"]
    if fmt in ("onnx", "int8"):
        return ["With onnxruntime (the graph holds the pooling and every head):", "", *onnx]
    first = st if fmt == "sentence-transformers" else hf
    second = hf if fmt == "sentence-transformers" else st[:0]
    out = [f"With {'sentence-transformers' if first is st else 'transformers'}:", "", *first, ""]
    if second:
        out += ["With transformers:", "", *second, ""]
    return out + ["With nsa_lib (every output of the model):", "", *nsa]


# export


def export(checkpoint: str | Path, fmt: str, output: str | Path, *, output_key: str = "embedding_semantic",
           dim: int | None = None, prefer: str = "best", overwrite: bool = False, verify: bool = True,
           stsb: bool | None = None, model: NSAModel | None = None) -> ExportReport:
    """Export the model at `checkpoint` (a model folder, checkpoint, or run folder: its `prefer` model,
    'best' or 'final') as `fmt` into the folder `output`.

    `output_key` / `dim` choose what the `hf` and `sentence-transformers` folders return by default.
    `verify` runs the format's check in this process (ONNX: parity with PyTorch; sentence-transformers:
    parity with `encode`); `stsb` (default: for int8) scores STS-B test for the float and the int8 model.
    An existing `output` is refused unless `overwrite`. Returns the report, also written to export.json.
    """
    from .evaluate import load_for_eval

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; formats: {', '.join(FORMATS)}")
    output = Path(output)
    if output.exists() and not overwrite and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    source = None
    if model is None:
        model, source = load_for_eval(Path(checkpoint), prefer=prefer)
    model = model.float().eval()
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        report = _write(model, source, fmt, work, output_key=output_key, dim=dim, verify=verify,
                        stsb=(fmt == "int8") if stsb is None else stsb)
        report.path = str(output)
        (work / "README.md").write_text(model_card(model, source, fmt))
        report.bytes = sum(p.stat().st_size for p in work.rglob("*") if p.is_file())
        (work / REPORT_FILE).write_text(json.dumps(asdict(report), indent=1))
        if output.exists():
            shutil.rmtree(output)
        work.replace(output)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return report


def _write(model: NSAModel, source: Path | None, fmt: str, folder: Path, *, output_key: str, dim: int | None,
           verify: bool, stsb: bool) -> ExportReport:
    from .hf_model import write_folder

    report = ExportReport(format=fmt, path=str(folder), bytes=0, source=str(source) if source else "")
    with torch.no_grad():  # the chosen output exists (a clear error here, not in the user's process)
        probe = model.tokenizer(["probe"], return_tensors="pt")
        pick_output(model(input_ids=probe["input_ids"]), output_key, dim)
    if fmt in ("hf", "sentence-transformers"):
        write_folder(model, model.tokenizer, folder, output=output_key, dim=dim,
                     sentence_transformers=fmt == "sentence-transformers")
        if verify:
            report.parity = (sentence_transformers_parity if fmt == "sentence-transformers" else hf_parity)(
                model, folder, output_key, dim)
        return report
    model.tokenizer.save_pretrained(str(folder))
    if fmt == "onnx":
        export_onnx(model, folder / ONNX_FILE)
        report.sizes = {"onnx": (folder / ONNX_FILE).stat().st_size}
        if verify:
            report.parity = onnx_parity(model, folder)
        if stsb:
            report.stsb_test = {"pytorch": _stsb_test(model), "onnx": _stsb_test(OnnxEncoder(folder))}
        return report
    # int8: the float graph first (kept out of the folder), then its quantised copy
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        float_path = export_onnx(model, Path(tmp) / ONNX_FILE)
        quantize_int8(float_path, folder / ONNX_FILE)
        shutil.copy(Path(tmp) / ONNX_INFO, folder / ONNX_INFO)
        report.sizes = {"onnx_fp32": float_path.stat().st_size, "onnx_int8": (folder / ONNX_FILE).stat().st_size}
        if verify:  # quantisation moves every activation a little by design: how far the embedding turns
            report.min_cosine = onnx_min_cosine(model, folder)
        if stsb:
            model.tokenizer.save_pretrained(tmp)
            report.stsb_test = {"onnx_fp32": _stsb_test(OnnxEncoder(tmp)), "onnx_int8": _stsb_test(OnnxEncoder(folder))}
    return report


def _stsb_test(encoder) -> float:
    from .data import load_stsb
    from .evaluate import nsa_encoder, sts_spearman

    if isinstance(encoder, NSAModel):
        encoder = nsa_encoder(encoder, encoder.tokenizer)
    return round(sts_spearman(encoder, load_stsb("test")), 5)


def hf_parity(model: NSAModel, folder: str | Path, output_key: str = "embedding_semantic", dim: int | None = None,
              texts: Sequence[str] = PARITY_SENTENCES) -> float:
    """Largest absolute difference between `AutoModel.from_pretrained(folder, trust_remote_code=True)`'s
    `pooler_output` and `model.encode` on `texts`, loaded in this process."""
    from transformers import AutoModel, AutoTokenizer

    loaded = AutoModel.from_pretrained(str(folder), trust_remote_code=True).eval()
    batch = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)(
        list(texts), padding=True, truncation=True, max_length=model.config.max_length, return_tensors="pt")
    with torch.no_grad():
        theirs = torch.nn.functional.normalize(loaded(**batch).pooler_output.float(), dim=-1).numpy()
    return float(np.abs(theirs - model.encode(list(texts), output_key, dim)).max())


def sentence_transformers_parity(model: NSAModel, folder: str | Path, output_key: str = "embedding_semantic",
                                 dim: int | None = None, texts: Sequence[str] = PARITY_SENTENCES) -> float:
    """Largest absolute difference between `SentenceTransformer(folder).encode` (normalised) and
    `model.encode` on `texts`, loaded in this process."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    theirs = st.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True)
    ours = model.encode(list(texts), output_key, dim)
    return float(np.abs(theirs - ours).max())


# the Hub


def push_to_hub(folder: str | Path, repo_id: str, *, token: str | None = None, private: bool = False,
                commit_message: str = "Upload Spectra-NSA model", endpoint: str | None = None) -> str:
    """Upload an export folder (`hf` or `sentence-transformers`; ONNX folders too) to the Hub repository
    `repo_id`, created if missing. `token`: default the one `huggingface_hub.login()` stored (in Colab:
    `from huggingface_hub import notebook_login; notebook_login()`). The model card names `repo_id`.
    Returns the commit's URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "config.json").is_file() and not (folder / ONNX_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not an export folder (no config.json or {ONNX_FILE})")
    card = folder / "README.md"
    if card.is_file():  # the usage snippets name the repository rather than a local path
        card.write_text(card.read_text().replace("path/to/this/folder", repo_id))
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                             commit_message=commit_message)
    return str(getattr(info, "commit_url", info))
