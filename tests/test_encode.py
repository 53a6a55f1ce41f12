"""NSAModel.encode / nsa_lib.encode against the literal forward pass, its input checks, and the tokenizer
kept with the model by save_pretrained / from_pretrained (a folder, a fresh process, a Hub id)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import nsa_lib
from nsa_lib import NSAConfig, NSAModel
from nsa_lib.data import load_snli_triplets, load_tokenizer, offline_minilm_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return NSAModel(NSAConfig.from_preset("tiny", dropout=0.0)).eval()


@pytest.fixture(scope="module")
def sentences():
    return [t.anchor for t in load_snli_triplets("test")[:30]] + ["", "short", "a much longer sentence " * 6]


def literal(model, tokenizer, text, output="embedding_semantic", dim=None):
    """One text alone, straight through forward(): what encode must give for it."""
    enc = tokenizer([text], return_tensors="pt", truncation=True, max_length=model.config.max_length)
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])[output]
    out = out[dim or max(out)] if isinstance(out, dict) else out
    return torch.nn.functional.normalize(out.float(), dim=-1)[0]


def test_encode_equals_the_forward_pass_of_each_text_alone(tiny, sentences):
    tokenizer = load_tokenizer(source="offline")
    vectors = tiny.encode(sentences, batch_size=7)
    assert isinstance(vectors, np.ndarray) and vectors.shape == (len(sentences), 64)
    expected = torch.stack([literal(tiny, tokenizer, s) for s in sentences])
    assert np.abs(vectors - expected.numpy()).max() < 1e-5  # sorted by length, returned in input order
    small = tiny.encode(sentences, dim=32, convert_to="torch")
    assert isinstance(small, torch.Tensor) and small.shape == (len(sentences), 32)
    assert torch.allclose(small.norm(dim=-1), torch.ones(len(sentences)))
    expected = torch.stack([literal(tiny, tokenizer, s, dim=32) for s in sentences[:5]])
    assert (small[:5] - expected).abs().max() < 1e-5
    ranking = nsa_lib.encode(tiny, sentences[:3], output="embedding_ranking")
    assert ranking.shape == (3, tiny.config.ranking_dim)
    one = tiny.encode(sentences[0])
    assert one.shape == (64,) and np.abs(one - vectors[0]).max() < 1e-6


def test_encode_refuses_what_is_not_text(tiny):
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        tiny.encode(["fine", 3])
    with pytest.raises(TypeError, match="texts must be a list of strings"):
        tiny.encode(42)
    with pytest.raises(KeyError, match="no output 'embedding_semantik'"):
        tiny.encode(["x"], output="embedding_semantik")
    with pytest.raises(KeyError, match="not 100"):
        tiny.encode(["x"], dim=100)
    with pytest.raises(ValueError, match="convert_to"):
        tiny.encode(["x"], convert_to="list")
    assert tiny.encode([""]).shape == (1, 64)  # an empty string is a text: [CLS] [SEP]


def test_the_tokenizer_is_saved_with_the_model_and_read_back(tmp_path, sentences):
    """save_pretrained writes the tokenizer next to the weights; from_pretrained reads that one, not the
    default vocabulary: a copy whose vocab.txt swaps two words encodes them swapped."""
    import shutil

    from transformers import AutoTokenizer

    vocab = tmp_path / "vocab"
    vocab.mkdir()
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (offline_minilm_dir() / name).is_file():
            shutil.copy(offline_minilm_dir() / name, vocab / name)
    words = (offline_minilm_dir() / "vocab.txt").read_text().splitlines()
    words[2003], words[2004] = words[2004], words[2003]  # "is" and "it" trade ids
    (vocab / "vocab.txt").write_text("\n".join(words) + "\n")
    swapped = AutoTokenizer.from_pretrained(str(vocab))
    assert swapped("is")["input_ids"][1] == 2004
    torch.manual_seed(0)
    model = NSAModel(NSAConfig.from_preset("tiny", dropout=0.0)).eval()
    model.save_pretrained(tmp_path / "model", tokenizer=swapped)
    assert (tmp_path / "model" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "model" / "config.json").read_text())["tokenizer"] == "bert-base-uncased"
    loaded = NSAModel.from_pretrained(tmp_path / "model")
    assert loaded.tokenizer("is")["input_ids"][1] == 2004
    assert np.abs(loaded.encode(["it is"]) - model.encode(["it is"], convert_to="numpy")).max() > 1e-4
    assert np.abs(loaded.encode(["it is"]) - loaded.outputs(["it is"], ["embedding_semantic"], tokenizer=swapped)
                  ["embedding_semantic"].numpy()).max() < 1e-6
    loaded.save_pretrained(tmp_path / "again")  # a loaded model saves the tokenizer it came with
    assert NSAModel.from_pretrained(tmp_path / "again").tokenizer("is")["input_ids"][1] == 2004


def test_a_warm_start_keeps_its_encoders_tokenizer(tmp_path):
    model = NSAModel.from_pretrained_encoder(offline_minilm_dir())
    assert model.config.tokenizer == str(offline_minilm_dir())
    model.save_pretrained(tmp_path / "warm")
    assert (tmp_path / "warm" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_a_saved_model_encodes_in_a_fresh_process_and_from_a_hub_id(tmp_path, tiny, sentences):
    """A folder from save_pretrained encodes in a new process as it did here; the same folder served as a
    Hub repository (tests/hub_standin.py, a local stand-in of the Hub's download API named by
    HF_ENDPOINT; the real Hub cannot be reached here) loads by its id."""
    from tests.hub_standin import HubStandin

    tiny.save_pretrained(tmp_path / "model", tokenizer=load_tokenizer(source="offline"))
    expected = tiny.encode(sentences)
    script = f"""
import json, sys
import nsa_lib
print(json.dumps({{"folder": nsa_lib.encode(sys.argv[1], {sentences!r}).tolist(),
                  "hub": nsa_lib.encode("someone/nsa-tiny", {sentences!r}).tolist()}}))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME")}
    with HubStandin({"someone/nsa-tiny": tmp_path / "model"}) as hub:
        env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_CACHE=str(tmp_path / "hf-cache"), HF_HUB_DISABLE_XET="1")
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model")], env=env, capture_output=True,
                              text=True, timeout=300, cwd=str(ROOT))
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert np.abs(np.array(got["folder"]) - expected).max() < 1e-5
    assert np.abs(np.array(got["hub"]) - expected).max() < 1e-5
