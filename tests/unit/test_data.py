"""Data: counted skips for bad input, determinism, exact resume, rank sharding."""

import json

import pytest

from rntp.config import DataConfig
from rntp.data import PositionStream
from tests.conftest import make_sentences

pytestmark = pytest.mark.unit


def cfg(source, **kw):
    base = dict(source=str(source), chunk_tokens=48, min_context=8, horizon=4, positions_per_chunk=2, seed=3)
    return DataConfig(**{**base, **kw})


def test_bad_lines_and_short_docs_are_skipped_and_counted(tmp_path, tokenizer):
    f = tmp_path / "bad.jsonl"
    good = " ".join(make_sentences(8, seed=1))
    with open(f, "wb") as out:
        out.write(json.dumps({"text": good}).encode() + b"\n")
        out.write(b'{"text": "unterminated\n')  # malformed JSON
        out.write(b'{"text": "bad bytes \xff\xfe here"}\n')  # undecodable UTF-8
        out.write(json.dumps({"other": "no text column"}).encode() + b"\n")
        out.write(json.dumps({"text": ""}).encode() + b"\n")  # empty
        out.write(json.dumps({"text": "too short"}).encode() + b"\n")
        out.write(b"\n")
    stream = PositionStream(cfg(f, shuffle=False), tokenizer)
    positions = stream.take(6)
    assert stream.stats == {"malformed_lines": 2, "undecodable_lines": 1, "empty_docs": 1, "short_docs": 1}
    assert all(p.doc == 0 for p in positions[:2])


def test_txt_file_with_undecodable_line(tmp_path, tokenizer):
    f = tmp_path / "doc.txt"
    f.write_bytes(("\n".join(make_sentences(10, seed=2)) + "\n").encode() + b"\xc3\x28 broken\n")
    stream = PositionStream(cfg(f), tokenizer)
    assert len(stream.take(3)) == 3
    assert stream.stats["undecodable_lines"] == 1


def test_no_usable_positions_is_a_clear_error(tmp_path, tokenizer):
    f = tmp_path / "tiny.jsonl"
    f.write_text(json.dumps({"text": "hi"}) + "\n")
    with pytest.raises(ValueError, match="no usable positions"):
        PositionStream(cfg(f), tokenizer).take(1)


def test_missing_source_is_a_clear_error(tokenizer):
    with pytest.raises(FileNotFoundError):
        PositionStream(cfg("/nonexistent/corpus.jsonl"), tokenizer)


def test_positions_are_in_bounds_and_deterministic(corpus_file, tokenizer):
    a = PositionStream(cfg(corpus_file), tokenizer).take(40)
    b = PositionStream(cfg(corpus_file), tokenizer).take(40)
    assert a == b
    for p in a:
        assert 8 <= p.p <= len(p.chunk) - 4 and len(p.target) == 4 and len(p.context) == p.p
    other = PositionStream(cfg(corpus_file, seed=4), tokenizer).take(40)
    assert other != a


@pytest.mark.parametrize("cut", [1, 7, 13])
def test_resume_from_state_continues_exactly(corpus_file, tokenizer, cut):
    full = PositionStream(cfg(corpus_file), tokenizer).take(30)
    first = PositionStream(cfg(corpus_file), tokenizer)
    first.take(cut)
    second = PositionStream(cfg(corpus_file), tokenizer)
    second.load_state(json.loads(json.dumps(first.state())))  # the state survives serialisation
    assert second.take(30 - cut) == full[cut:]


def test_epochs_wrap_around(tmp_path, tokenizer):
    f = tmp_path / "one.jsonl"
    f.write_text(json.dumps({"text": " ".join(make_sentences(6, seed=5))}) + "\n")
    stream = PositionStream(cfg(f), tokenizer)
    stream.take(10)
    assert stream.epoch >= 1


@pytest.mark.parametrize("heldout_fraction", [0.0, 0.25])  # a carve-out filters the stream; resume stays exact
def test_streaming_matches_resume_too(corpus_file, tokenizer, heldout_fraction):
    c = cfg(corpus_file, streaming=True, shuffle_buffer=8, heldout_fraction=heldout_fraction)
    full = PositionStream(c, tokenizer).take(12)
    first = PositionStream(c, tokenizer)
    first.take(5)
    second = PositionStream(c, tokenizer)
    second.load_state(first.state())
    assert second.take(7) == full[5:]


def test_ranks_own_disjoint_documents(corpus_file, tokenizer):
    r0 = PositionStream(cfg(corpus_file), tokenizer, rank=0, world_size=2).take(20)
    r1 = PositionStream(cfg(corpus_file), tokenizer, rank=1, world_size=2).take(20)
    assert {p.doc % 2 for p in r0} == {0} and {p.doc % 2 for p in r1} == {1}


def test_parquet_and_saved_dataset_sources(tmp_path, tokenizer):
    import datasets

    ds = datasets.Dataset.from_dict({"body": [" ".join(make_sentences(8, seed=s)) for s in range(4)]})
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for source in (tmp_path / "d.parquet", tmp_path / "saved"):
        stream = PositionStream(cfg(source, text_column="body"), tokenizer)
        assert len(stream.take(5)) == 5
    with pytest.raises(ValueError, match="text column 'text' not in"):
        PositionStream(cfg(tmp_path / "d.parquet"), tokenizer)


def test_entropy_policy_keeps_only_the_chosen_quantile_range(corpus_file, tokenizer):
    import torch

    # entropy rising with the position: the top half of each chunk's candidates must be chosen
    fake_entropy = lambda ids: torch.arange(len(ids), dtype=torch.float32)  # noqa: E731
    c = cfg(corpus_file, position_policy="entropy", entropy_quantiles=(0.5, 1.0), positions_per_chunk=3)
    for p in PositionStream(c, tokenizer, entropy_fn=fake_entropy).take(30):
        lo, hi = 8, len(p.chunk) - 4
        assert p.p >= (lo + hi) / 2 - 0.5
    with pytest.raises(ValueError, match="needs a model"):
        PositionStream(c, tokenizer)


def test_binary_files_and_binary_documents_are_skipped_and_counted(tmp_path, tokenizer):
    import random

    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a_good.txt").write_text(" ".join(make_sentences(10, seed=7)))
    rng = random.Random(0)
    (folder / "b_random.txt").write_bytes(bytes(rng.randrange(256) for _ in range(6000)))
    (folder / "c_nul.txt").write_bytes(b"ELF\x00\x00\x01" + "text between NULs ".encode() * 50 + b"\x00" * 64)
    no_nul = bytes(rng.choice([b for b in range(1, 256) if b not in b"\n"]) for _ in range(3000))
    (folder / "d_random_no_nul.txt").write_bytes(no_nul)
    stream = PositionStream(cfg(folder, shuffle=False), tokenizer)
    positions = stream.take(4)
    assert stream.stats["binary_files"] == 3
    assert all(p.doc == 0 for p in positions)  # only the text file gives positions
    # inside JSONL (escaped NULs, control characters) and in a parquet text column
    f = tmp_path / "blobs.jsonl"
    with open(f, "w") as out:
        out.write(json.dumps({"text": " ".join(make_sentences(8, seed=1))}) + "\n")
        out.write(json.dumps({"text": "\x00\x01\x02" * 200}) + "\n")
        out.write(json.dumps({"text": "PK\x03\x04" + "\x00" * 30 + "zip"}) + "\n")
    stream = PositionStream(cfg(f, shuffle=False), tokenizer)
    stream.take(10)  # past the end of the file
    assert stream.stats["binary_docs"] == 2


def test_usable_positions_are_checked_up_front_without_moving_the_cursor(tmp_path, tokenizer, corpus_file):
    f = tmp_path / "short.jsonl"
    f.write_text("".join(json.dumps({"text": f"doc {i} is short"}) + "\n" for i in range(30)) + "{broken\n")
    problem = PositionStream(cfg(f), tokenizer).problem()
    assert problem and "no usable positions" in problem and "data.min_context + data.horizon = 12" in problem
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\x00\xff" * 500)
    with pytest.raises(ValueError, match="no documents could be read"):  # every file skipped as binary
        PositionStream(cfg(binary), tokenizer)
    ok = PositionStream(cfg(corpus_file), tokenizer)
    assert ok.problem() is None and ok.stats == {}
    assert ok.take(5) == PositionStream(cfg(corpus_file), tokenizer).take(5)  # the look-ahead moved nothing
    streamed = PositionStream(cfg(f, streaming=True), tokenizer)
    assert "no usable positions" in streamed.problem() and streamed.stats == {}


def sharded_parquet(folder, shards=8, per_shard=30):
    """A local corpus in parquet shards; every document carries its own id as its first word."""
    import datasets

    folder.mkdir()
    for s in range(shards):
        texts = [f"D{s * per_shard + i:04d} " + " ".join(make_sentences(4, seed=s * per_shard + i))
                 for i in range(per_shard)]
        datasets.Dataset.from_dict({"text": texts}).to_parquet(str(folder / f"part-{s:03d}.parquet"))
    return folder


def doc_ids(positions, tokenizer):
    return {tokenizer.decode(p.chunk[:6]).split()[0] for p in positions}


@pytest.fixture
def parquet_rows_read(monkeypatch):
    """Rows read from parquet files by datasets itself (independent of the stream's own counter)."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    count = {"rows": 0}
    original = Parquet._generate_tables

    def counted(self, *args, **kwargs):
        for key, table in original(self, *args, **kwargs):
            count["rows"] += len(table)
            yield key, table

    monkeypatch.setattr(Parquet, "_generate_tables", counted)
    return count


def test_streamed_sharded_corpus_two_ranks_disjoint_exact_resume_in_constant_reads(tmp_path, tokenizer,
                                                                                    parquet_rows_read):
    corpus = sharded_parquet(tmp_path / "corpus")
    # one chunk per document, one position per chunk: positions map one to one onto documents
    c = cfg(corpus, streaming=True, shuffle_buffer=16, chunk_tokens=256, positions_per_chunk=1)
    ranks = [PositionStream(c, tokenizer, rank=r, world_size=2) for r in (0, 1)]
    epoch = [[p for p in r.take(200) if p.epoch == 0] for r in ranks]
    ids = [doc_ids(e, tokenizer) for e in epoch]
    assert ids[0].isdisjoint(ids[1]) and len(ids[0] | ids[1]) == 240  # disjoint, and together all of it
    assert all(len(e) == 120 for e in epoch)
    # each rank read only its share of the corpus (its 4 shards) per epoch, never the other rank's
    fresh = PositionStream(c, tokenizer, rank=1, world_size=2)
    parquet_rows_read["rows"] = 0
    fresh.take(120)
    assert fresh.docs_read == 120 and parquet_rows_read["rows"] == 120
    # exact resume, from early and late cuts, on both ranks; resuming reads no consumed document again
    for rank in (0, 1):
        full = PositionStream(c, tokenizer, rank=rank, world_size=2).take(150)
        reads = []
        for cut in (3, 100):
            first = PositionStream(c, tokenizer, rank=rank, world_size=2)
            first.take(cut)
            state = first.state()
            second = PositionStream(c, tokenizer, rank=rank, world_size=2)
            second.load_state(state)
            parquet_rows_read["rows"] = 0
            assert second.take(1) == full[cut : cut + 1]
            reads.append((second.docs_read, parquet_rows_read["rows"]))
            assert second.take(150 - cut - 1) == full[cut + 1 :]
        # what resuming costs does not grow with how far the run had read (3 vs 100 documents in)
        # (datasets re-reads at most the current shard's rows, or the one just finished: 2 x 30, whereas
        # re-reading from the start would be over 100; earlier shards are not opened)
        assert reads[0][0] <= 1 and reads[1][0] <= 1 and max(r[1] for r in reads) <= 60, reads


@pytest.mark.parametrize("streaming", [False, True])
def test_heldout_fraction_carves_a_disjoint_heldout_split_from_one_split(corpus_file, tokenizer, streaming):
    """data.heldout_fraction: training reads the source's split without the carve-out, any other split reads
    exactly the carve-out (by a BLAKE2b hash of the text, recomputed here with hashlib), together all of it."""
    import hashlib
    from collections import Counter

    from rntp.data import load_documents

    texts = [json.loads(line)["text"] for line in open(corpus_file)]
    expected = {t for t in texts if int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "big")
                / 2**64 < 0.25}
    assert 0 < len(expected) < len(texts)
    c = cfg(corpus_file, heldout_fraction=0.25, streaming=streaming)
    train = [row["text"] for row in load_documents(c, Counter())]
    heldout = [row["text"] for row in load_documents(c, Counter(), split="heldout")]
    assert set(heldout) == expected and not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(texts)
    # positions of the held-out split come only from held-out documents
    held_tokens = [tokenizer.encode(t, add_special_tokens=False) for t in expected]
    for p in PositionStream(c, tokenizer, split="heldout").first_epoch(10):
        assert any(list(p.chunk) == ids[i : i + len(p.chunk)] for ids in held_tokens for i in range(0, len(ids), 48))
    assert [row["text"] for row in load_documents(cfg(corpus_file), Counter(), split="heldout")] == texts  # off
