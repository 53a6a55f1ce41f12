"""nsa_lib.export: every format loaded in a fresh process as a user would (no nsa_lib importable there),
compared with the PyTorch model here; the model card; the Hub push through a local stand-in of the Hub's
HTTP API (tests/hub_standin.py; the real Hub cannot be reached here)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from nsa_lib import NSAConfig, NSAModel
from nsa_lib.data import load_stsb
from nsa_lib.export import FORMATS, ONNX_FILE, export, onnx_output_names

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sentences():
    """A padded batch of real sentences (STS-B test), short to long."""
    pairs = load_stsb("test")[:40]
    texts = sorted({p.sentence1 for p in pairs}, key=len)
    return texts[::3][:12] + ["Dogs."]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return NSAModel(NSAConfig.from_preset("tiny")).eval()


@pytest.fixture(scope="module")
def warm():
    """A warm start on all-MiniLM-L6-v2 whose additions are switched on (at step 0 the spectral path and
    the fractal term contribute zero; here they must run for the parity checks to mean something)."""
    torch.manual_seed(1)
    model = NSAModel.from_pretrained_encoder("all-MiniLM-L6-v2").eval()
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.attn.fractal_weights.fill_(0.3)
            layer.attn.st.weight.normal_(std=0.05)
    return model


def fresh(code: str, cwd: Path, **env_extra: str) -> dict:
    """Run `code` in a new isolated interpreter (`python -I`: neither this repository nor PYTHONPATH on its
    path) in `cwd`, with a remote-code module cache of its own (a user who never loaded this model); it
    must first prove that nsa_lib cannot be imported, and print one JSON line last."""
    prelude = "import importlib.util, json, sys\nassert importlib.util.find_spec('nsa_lib') is None, 'nsa_lib importable'\n"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
           "HF_MODULES_CACHE": str(cwd / "hf-modules"), **env_extra}
    done = subprocess.run([sys.executable, "-I", "-c", prelude + code], cwd=str(cwd), env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def reference(model, texts, max_length=None):
    batch = model.tokenizer(list(texts), padding=True, truncation=True,
                            max_length=max_length or model.config.max_length, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


ONNX_RUN = """
import numpy as np, onnxruntime as ort
from transformers import AutoTokenizer
folder, texts = FOLDER, TEXTS
session = ort.InferenceSession(folder + "/model.onnx", providers=["CPUExecutionProvider"])
tokenizer = AutoTokenizer.from_pretrained(folder)
result = {"inputs": [(i.name, i.shape) for i in session.get_inputs()], "names": [o.name for o in session.get_outputs()]}
for key, batch in (("all", texts), ("three", texts[-3:])):  # two batch sizes, two padded lengths
    enc = tokenizer(batch, padding=True, return_tensors="np")
    values = session.run(None, {"input_ids": enc["input_ids"].astype(np.int64),
                                "attention_mask": enc["attention_mask"].astype(np.int64)})
    result[key] = {n: v.tolist() for n, v in zip(result["names"], values)}
print(json.dumps(result))
"""


def flat_outputs(model, out) -> dict[str, np.ndarray]:
    flat = {f"{k}_{d}": v for k in ("embedding_semantic", "entity") for d, v in out[k].items()}
    flat.update({k: v for k, v in out.items() if not isinstance(v, dict) and k != "last_hidden_state"})
    return {name: flat[name].numpy() for name in onnx_output_names(model)}


@pytest.mark.slow
@pytest.mark.parametrize("which", ["tiny", "warm"])
def test_onnx_matches_pytorch_on_padded_batches_in_a_fresh_process(which, request, tmp_path, sentences):
    import onnx

    model = request.getfixturevalue(which)
    if which == "warm":  # the documented command, on a saved folder
        model.save_pretrained(tmp_path / "model")
        done = subprocess.run([sys.executable, "-m", "nsa_lib", "export", "--checkpoint", str(tmp_path / "model"),
                               "--format", "onnx", "--output", str(tmp_path / "onnx")], cwd=str(ROOT),
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "max |difference| to PyTorch" in done.stdout
    else:
        export(None, "onnx", tmp_path / "onnx", model=model)
    graph = onnx.load(str(tmp_path / "onnx" / ONNX_FILE))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    got = fresh(ONNX_RUN.replace("FOLDER", repr(str(tmp_path / "onnx"))).replace("TEXTS", repr(sentences)), tmp_path)
    assert [name for name, _ in got["inputs"]] == ["input_ids", "attention_mask"]
    assert all(isinstance(d, str) for _, shape in got["inputs"] for d in shape)  # dynamic batch and sequence
    assert got["names"] == onnx_output_names(model)
    for key, batch in (("all", sentences), ("three", sentences[-3:])):
        expected = flat_outputs(model, reference(model, batch))
        for name, value in expected.items():
            assert np.abs(np.array(got[key][name]) - value).max() <= 1e-4, (key, name)


@pytest.mark.slow
def test_the_hf_folder_loads_with_automodel_where_nsa_lib_is_not_installed(tmp_path, warm, sentences):
    report = export(None, "hf", tmp_path / "hf", model=warm)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["auto_map"]["AutoModel"] == "hf_model.SpectraNSAModel"
    assert report.bytes > 80e6
    got = fresh(f"""
import torch
from transformers import AutoModel, AutoTokenizer
folder, texts = {str(tmp_path / 'hf')!r}, {sentences!r}
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
with torch.no_grad():
    out = model(**batch)
print(json.dumps({{"class": type(model).__name__, "pooler": out.pooler_output.tolist(),
                  "sem256": out.embeddings["embedding_semantic"][256].tolist(),
                  "score": out.embeddings["anomaly_score"].tolist()}}))
""", tmp_path)
    assert got["class"] == "SpectraNSAModel"
    assert np.abs(np.array(got["pooler"]) - warm.encode(sentences)).max() <= 1e-5
    assert np.abs(np.array(got["sem256"]) - warm.encode(sentences, dim=256)).max() <= 1e-5
    assert np.abs(np.array(got["score"]) - warm.encode(sentences, "anomaly_score")).max() <= 1e-5


def test_the_exported_code_imports_only_the_files_shipped_with_it(tmp_path, tiny):
    """transformers copies every module a shipped file names in a relative import, wherever the statement
    stands (a function body included); each must be in the folder, and nothing beyond the model's own."""
    from transformers.dynamic_module_utils import get_relative_import_files

    from nsa_lib.hf_model import CODE_FILES

    export(None, "hf", tmp_path / "hf", model=tiny)
    shipped = sorted(p.name for p in (tmp_path / "hf").glob("*.py"))
    assert shipped == sorted(CODE_FILES)
    needed = {Path(p).name for p in get_relative_import_files(str(tmp_path / "hf" / "hf_model.py"))}
    assert needed | {"hf_model.py"} == set(CODE_FILES)


@pytest.mark.slow
def test_the_sentence_transformers_folder_gives_our_encode(tmp_path, warm, sentences):
    export(None, "sentence-transformers", tmp_path / "st", model=warm)
    dims = warm.config.sem_dims
    got = fresh(f"""
from sentence_transformers import SentenceTransformer
model = SentenceTransformer({str(tmp_path / 'st')!r}, trust_remote_code=True, device="cpu")
texts = {sentences!r}
out = {{"dimension": model.get_sentence_embedding_dimension(), "default": model.encode(texts).tolist()}}
for dim in {dims!r}:
    out[str(dim)] = model.encode(texts, truncate_dim=dim, normalize_embeddings=True).tolist()
print(json.dumps(out))
""", tmp_path)
    assert got["dimension"] == dims[0]
    assert np.abs(np.array(got["default"]) - warm.encode(sentences)).max() <= 1e-5
    for dim in dims:
        assert np.abs(np.array(got[str(dim)]) - warm.encode(sentences, dim=dim)).max() <= 1e-5, dim


def test_the_sentence_transformers_folder_returns_the_chosen_output(tmp_path, tiny, sentences):
    from sentence_transformers import SentenceTransformer

    report = export(None, "sentence-transformers", tmp_path / "st", model=tiny, output_key="embedding_ranking")
    assert report.parity == 0.0 or report.parity <= 1e-6
    st = SentenceTransformer(str(tmp_path / "st"), trust_remote_code=True, device="cpu")
    got = st.encode(sentences, normalize_embeddings=True)
    assert got.shape == (len(sentences), tiny.config.ranking_dim)
    assert np.abs(got - tiny.encode(sentences, "embedding_ranking")).max() <= 1e-5


@pytest.mark.slow
def test_int8_is_smaller_and_keeps_the_sts_b_score(tmp_path):
    """The pretrained warm start (its additions at zero, so it scores what all-MiniLM-L6-v2 scores): fp32
    and int8 ONNX, scored on 400 STS-B test pairs in a fresh process."""
    from scipy.stats import spearmanr

    model = NSAModel.from_pretrained_encoder("all-MiniLM-L6-v2").eval()
    report = export(None, "int8", tmp_path / "int8", model=model)
    export(None, "onnx", tmp_path / "onnx", model=model)
    assert report.sizes["onnx_int8"] < 0.35 * report.sizes["onnx_fp32"]
    assert 0.9 < report.min_cosine <= 1.0 + 1e-6  # int8 turns the embedding a little (measured: ≥ 0.947)
    assert (tmp_path / "onnx" / ONNX_FILE).stat().st_size == report.sizes["onnx_fp32"]
    assert abs(report.stsb_test["onnx_fp32"] - report.stsb_test["onnx_int8"]) <= 0.01
    pairs = load_stsb("test")[:400]
    texts = [p.sentence1 for p in pairs] + [p.sentence2 for p in pairs]
    got = fresh(f"""
import numpy as np, onnxruntime as ort
from transformers import AutoTokenizer
texts = {texts!r}
out = {{}}
for name in ("onnx", "int8"):
    folder = {str(tmp_path)!r} + "/" + name
    session = ort.InferenceSession(folder + "/model.onnx", providers=["CPUExecutionProvider"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vectors = []
    for start in range(0, len(texts), 64):
        enc = tokenizer(texts[start:start + 64], padding=True, return_tensors="np")
        vectors.append(session.run(["embedding_semantic_768"], {{"input_ids": enc["input_ids"].astype(np.int64),
                                    "attention_mask": enc["attention_mask"].astype(np.int64)}})[0])
    out[name] = np.concatenate(vectors).tolist()
print(json.dumps(out))
""", tmp_path)
    gold = [p.score for p in pairs]
    scores = {}
    for name, vectors in got.items():
        v = np.array(vectors)
        a, b = v[:len(pairs)], v[len(pairs):]
        scores[name] = spearmanr((a * b).sum(1), gold).statistic
    assert scores["onnx"] > 0.8  # the pretrained model's level
    assert abs(scores["onnx"] - scores["int8"]) <= 0.01, scores


def test_exports_refuse_bad_requests_and_leave_nothing_behind(tmp_path, tiny):
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export(None, "tflite", tmp_path / "x", model=tiny)
    with pytest.raises(KeyError, match="no output 'embedding_nope'"):
        export(None, "hf", tmp_path / "x", model=tiny, output_key="embedding_nope")
    with pytest.raises(KeyError, match="has dims"):
        export(None, "sentence-transformers", tmp_path / "x", model=tiny, dim=100)
    with pytest.raises(FileNotFoundError, match="no model under"):
        export(tmp_path / "missing", "onnx", tmp_path / "x")
    assert list(tmp_path.iterdir()) == []  # no temporary folder, no partial export
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        export(None, "hf", tmp_path / "taken", model=tiny)
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    export(None, "hf", tmp_path / "taken", model=tiny, overwrite=True)
    assert not (tmp_path / "taken" / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_the_model_card_describes_the_run(tmp_path):
    """A run folder as a short real training run leaves it, plus an eval report in eval/: the card gives
    the config, the data and steps, the evaluation table and metadata the Hub can read."""
    from nsa_lib.data import load_tokenizer
    from nsa_lib.trainer import Trainer

    run = tmp_path / "run"
    config = NSAConfig.from_preset("tiny", batch_train=8, max_steps=4, save_every=2, eval_every=2, eval_pairs=40,
                                   max_length=32)
    Trainer(config, data="snli", output_dir=run, tokenizer=load_tokenizer(source="offline"),
            show_progress=False).train()
    (run / "eval").mkdir()
    (run / "eval" / "results.md").write_text("# Evaluation\n\n| task | metric | Spectra-NSA |\n|---|---|---|\n"
                                             "| stsb-test | spearman | 0.8123 |\n")
    parameters = NSAModel.from_pretrained(run / "final").num_parameters()
    for fmt in FORMATS:
        export(run, fmt, tmp_path / fmt, prefer="final", stsb=False)
        card = (tmp_path / fmt / "README.md").read_text()
        meta = yaml.safe_load(card.split("---")[1])
        assert meta["license"] == "apache-2.0" and "sentence-similarity" in meta["tags"]
        assert "| stsb-test | spearman | 0.8123 |" in card
        assert "- data: snli" in card and "- optimizer steps: 4" in card and "- triplets per step: 8" in card
        assert f"| parameters | {parameters:,} |" in card
        assert ("onnxruntime" in card) == (fmt in ("onnx", "int8"))
        assert ("SentenceTransformer(" in card) == (fmt == "sentence-transformers")
        assert json.loads((tmp_path / fmt / "export.json").read_text())["source"] == str(run / "final")


@pytest.mark.slow
def test_push_to_hub_then_load_by_its_id(tmp_path, tiny, sentences):
    """Pushed through huggingface_hub to tests/hub_standin.py (a local stand-in of the Hub's HTTP API:
    repository creation, metadata check, pre-upload, commit), then loaded back by its id in a fresh process."""
    from tests.hub_standin import HubStandin

    from nsa_lib.export import push_to_hub

    export(None, "sentence-transformers", tmp_path / "st", model=tiny)
    with HubStandin(uploads=tmp_path / "hub") as hub:
        url = push_to_hub(tmp_path / "st", "alice/nsa-tiny", token="hf_secret", private=True, endpoint=hub.endpoint)
        assert url == f"{hub.endpoint}/alice/nsa-tiny/commit/{hub.commit('alice/nsa-tiny')}"
        assert hub.created == [{"name": "nsa-tiny", "organization": "alice", "visibility": "private", "type": "model"}]
        assert set(hub.auth) == {"Bearer hf_secret"}
        pushed = tmp_path / "hub" / "alice" / "nsa-tiny"
        local = {p.name: p.read_bytes() for p in (tmp_path / "st").iterdir()}
        assert {p.name: p.read_bytes() for p in pushed.iterdir()} == local
        assert 'SentenceTransformer("alice/nsa-tiny"' in local["README.md"].decode()
        got = fresh(f"""
from sentence_transformers import SentenceTransformer
model = SentenceTransformer("alice/nsa-tiny", trust_remote_code=True, device="cpu")
print(json.dumps(model.encode({sentences!r}).tolist()))
""", tmp_path, HF_ENDPOINT=hub.endpoint, HF_HUB_CACHE=str(tmp_path / "cache"), HF_HUB_DISABLE_XET="1",
            HF_HUB_OFFLINE="0")
    assert np.abs(np.array(got) - tiny.encode(sentences)).max() <= 1e-5
