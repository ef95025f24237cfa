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


def test_streaming_matches_resume_too(corpus_file, tokenizer):
    c = cfg(corpus_file, streaming=True, shuffle_buffer=8)
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
