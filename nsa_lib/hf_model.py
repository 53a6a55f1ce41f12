"""Spectra-NSA for transformers and sentence-transformers, with no nsa_lib installed.

`nsa_lib.export` copies this file into an exported folder next to config.py, attention.py,
cpu_attention.py, model.py and safe_load.py (the modules it imports, and nothing more), so that

    AutoModel.from_pretrained(folder, trust_remote_code=True)          -> SpectraNSAModel
    SentenceTransformer(folder, trust_remote_code=True)                -> SpectraNSASentenceEmbedder

load the model with transformers' remote-code mechanism. Inside nsa_lib the same classes import as
`nsa_lib.hf_model` (the tests use both).

The folder's config.json is a transformers config (`model_type` 'spectra-nsa', `auto_map`) that carries
the NSAConfig under `nsa`; model.safetensors holds NSAModel's weights under the prefix `nsa.`.

Not handled here: training through transformers' Trainer (use nsa_lib), token-type ids (one segment).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from .config import NSAConfig
from .model import NSAModel, pick_output

WEIGHTS_PREFIX = "nsa."
MODULE = Path(__file__).stem  # 'hf_model', in nsa_lib and in an exported folder alike
# this module and what it imports, transitively (no other nsa_lib module: see model._sibling)
CODE_FILES = (f"{MODULE}.py", "config.py", "model.py", "attention.py", "cpu_attention.py", "safe_load.py")
AUTO_MAP = {"AutoConfig": f"{MODULE}.SpectraNSAConfig", "AutoModel": f"{MODULE}.SpectraNSAModel"}


class SpectraNSAConfig(PretrainedConfig):
    """A transformers config around an NSAConfig (`nsa`, its dict). `output` and `dim` choose the
    embedding that `pooler_output` and the sentence-transformers module return (default
    `embedding_semantic` at its largest width)."""

    model_type = "spectra-nsa"

    def __init__(self, nsa: dict[str, Any] | None = None, output: str = "embedding_semantic",
                 dim: int | None = None, **kwargs: Any):
        self.nsa = dict(nsa or {})
        self.output = output
        self.dim = dim
        super().__init__(**kwargs)

    def nsa_config(self) -> NSAConfig:
        return NSAConfig.from_dict({**NSAConfig().to_dict(), **self.nsa})


@dataclass
class SpectraNSAOutput(ModelOutput):
    """`pooler_output`: the chosen embedding (L2-normalised), (B, D); `last_hidden_state`: (B, S, H);
    `embeddings`: every output of the model by name (Matryoshka outputs as {dim: tensor})."""

    pooler_output: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    embeddings: dict[str, Any] | None = None


class SpectraNSAModel(PreTrainedModel):
    """NSAModel as a transformers model: `model(input_ids, attention_mask)` -> SpectraNSAOutput.

    Example:
        >>> model = AutoModel.from_pretrained(folder, trust_remote_code=True)
        >>> tokenizer = AutoTokenizer.from_pretrained(folder)
        >>> batch = tokenizer(["A man plays a guitar."], padding=True, return_tensors="pt")
        >>> model(**batch).pooler_output.shape      # embedding_semantic at 768
    """

    config_class = SpectraNSAConfig
    base_model_prefix = "nsa"
    main_input_name = "input_ids"

    def __init__(self, config: SpectraNSAConfig):
        super().__init__(config)
        self.nsa = NSAModel(config.nsa_config())
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:  # every weight comes from the checkpoint
        pass

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, output: str | None = None, dim: int | None = None,
                **kwargs: Any) -> SpectraNSAOutput:
        out = self.nsa(input_ids=input_ids, attention_mask=attention_mask)
        chosen = pick_output(out, output or self.config.output, dim if dim is not None else self.config.dim)
        return SpectraNSAOutput(pooler_output=chosen, last_hidden_state=out["last_hidden_state"], embeddings=out)


def read_folder(folder: str | Path) -> tuple[SpectraNSAConfig, NSAModel]:
    """The config and the NSAModel (eval mode) of an exported folder, read without transformers' loader."""
    folder = Path(folder)
    config = SpectraNSAConfig(**json.loads((folder / "config.json").read_text()))
    model = NSAModel(config.nsa_config())
    state = load_file(str(folder / "model.safetensors"))
    model.load_state_dict({k[len(WEIGHTS_PREFIX):]: v for k, v in state.items() if k.startswith(WEIGHTS_PREFIX)})
    return config, model.eval()


def write_folder(model: NSAModel, tokenizer, folder: str | Path, *, output: str = "embedding_semantic",
                 dim: int | None = None, sentence_transformers: bool = False) -> Path:
    """Write `model` as a folder that transformers' AutoModel loads with trust_remote_code: config.json
    (with `auto_map`), model.safetensors, the tokenizer and this module with the modules it imports
    (CODE_FILES, copied from where this module lies). `sentence_transformers` adds modules.json and
    config_sentence_transformers.json, for SentenceTransformer(folder, trust_remote_code=True)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).resolve().parent
    for name in CODE_FILES:
        (folder / name).write_bytes((here / name).read_bytes())
    config = SpectraNSAConfig(nsa=model.config.to_dict(), output=output, dim=dim,
                              architectures=["SpectraNSAModel"], auto_map=AUTO_MAP)
    config.save_pretrained(str(folder))
    save_file({WEIGHTS_PREFIX + k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(folder))
    if sentence_transformers:
        modules = [{"idx": 0, "name": "0", "path": "", "type": f"{MODULE}.SpectraNSASentenceEmbedder"}]
        (folder / "modules.json").write_text(json.dumps(modules, indent=2))
        (folder / "config_sentence_transformers.json").write_text(json.dumps(
            {"similarity_fn_name": "cosine", "prompts": {}, "default_prompt_name": None}, indent=2))
    return folder


class SpectraNSASentenceEmbedder(nn.Module):
    """The whole Spectra-NSA model as one sentence-transformers module: tokenises, runs the model and
    returns the chosen embedding as `sentence_embedding` (and the token states as `token_embeddings`).

    `SentenceTransformer(folder, trust_remote_code=True, truncate_dim=256).encode(texts,
    normalize_embeddings=True)` equals `NSAModel.encode(texts, dim=256)`.
    """

    def __init__(self, model: NSAModel, tokenizer, output: str = "embedding_semantic", dim: int | None = None,
                 max_length: int | None = None):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.output, self.dim = output, dim
        self.max_seq_length = max_length or model.config.max_length

    def tokenize(self, texts: list[str], **kwargs: Any) -> dict[str, torch.Tensor]:
        if texts and not isinstance(texts[0], str):
            raise TypeError(f"SpectraNSASentenceEmbedder embeds text, got {type(texts[0]).__name__}")
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_seq_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def preprocess(self, inputs: list[str], prompt: str | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        return self.tokenize([prompt + t for t in inputs] if prompt else inputs)

    def forward(self, features: dict[str, torch.Tensor], **kwargs: Any) -> dict[str, torch.Tensor]:
        out = self.model(input_ids=features["input_ids"], attention_mask=features["attention_mask"])
        features["sentence_embedding"] = pick_output(out, self.output, self.dim)
        features["token_embeddings"] = out["last_hidden_state"]
        return features

    def get_sentence_embedding_dimension(self) -> int:
        if self.dim is not None:
            return int(self.dim)
        with torch.no_grad():  # the width of the chosen output, read off one token
            ids = torch.tensor([[0]], device=next(self.model.parameters()).device)
            return int(pick_output(self.model(input_ids=ids), self.output).shape[-1])

    def save(self, output_path: str, *args: Any, **kwargs: Any) -> None:
        write_folder(self.model, self.tokenizer, output_path, output=self.output, dim=self.dim,
                     sentence_transformers=True)

    @staticmethod
    def load(input_path: str) -> "SpectraNSASentenceEmbedder":
        from transformers import AutoTokenizer

        config, model = read_folder(input_path)
        return SpectraNSASentenceEmbedder(model, AutoTokenizer.from_pretrained(input_path, trust_remote_code=True),
                                          config.output, config.dim)
