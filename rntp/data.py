"""Documents -> token chunks -> positions, deterministic and resumable.

Documents come through `datasets` (local .txt/.jsonl/.parquet files, a `save_to_disk`
folder, or a hub name). Bad input is skipped and counted, never fatal mid-run: malformed
JSONL lines, undecodable bytes, empty documents and documents too short for one position.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import datasets
from datasets.distributed import split_dataset_by_node
import numpy as np
import torch

from rntp.config import DataConfig
from rntp.prepare import DEFAULT_CORPUS, default_corpus_dir, hub_name, hub_offline

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".jsonl", ".json"}
SUFFIXES = TEXT_SUFFIXES | {".parquet"}


@dataclass(frozen=True)
class Position:
    """A place in a chunk where the policy thinks: context = ids[:p], target = ids[p:p+horizon]."""

    chunk: tuple[int, ...]
    p: int
    horizon: int
    doc: int  # provenance: document index in the (shuffled) stream, and chunk index within it
    chunk_index: int
    epoch: int = 0

    @property
    def context(self) -> list[int]:
        return list(self.chunk[: self.p])

    @property
    def target(self) -> list[int]:
        return list(self.chunk[self.p : self.p + self.horizon])


def looks_binary(text: str | bytes) -> bool:
    """NUL bytes, or more than 10% of characters that text does not have (undecodable bytes,
    control characters): a binary file or blob, not a document."""
    if isinstance(text, bytes):
        if b"\x00" in text:
            return True
        text = text.decode("utf-8", errors="replace")
    if "\x00" in text:
        return True
    odd = sum(1 for c in text if c == "\ufffd" or (c < " " and c not in "\t\n\r\f\v"))
    return odd > 0.1 * max(len(text), 1)


def read_text_files(files: list[str], text_column: str, stats: Counter) -> Iterator[dict]:
    """Tolerant reader: a .txt file is one document; a .jsonl line is one record. Lines with
    undecodable bytes or broken JSON are skipped and counted, binary files too."""
    for name in files:
        path = Path(name)
        with open(path, "rb") as f:
            head = f.read(8192)
        if looks_binary(head):
            stats["binary_files"] += 1
            continue
        if path.suffix == ".txt":
            kept = []
            with open(path, "rb") as f:
                for raw in f:
                    try:
                        kept.append(raw.decode("utf-8"))
                    except UnicodeDecodeError:
                        stats["undecodable_lines"] += 1
            yield {"text": "".join(kept)}
            continue
        with open(path, "rb") as f:
            for raw in f:
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    stats["undecodable_lines"] += 1
                    continue
                except json.JSONDecodeError:
                    stats["malformed_lines"] += 1
                    continue
                text = record.get(text_column) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    stats["malformed_lines"] += 1
                    continue
                yield {"text": text}


def _local_files(path: Path) -> list[str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no .txt/.jsonl/.parquet files under {path}")
    kinds = {p.suffix in TEXT_SUFFIXES for p in files}
    if len(kinds) > 1:
        raise ValueError(f"{path} mixes parquet and text files; point data.source at one kind")
    return [str(p) for p in files]


def heldout_document(text, fraction: float) -> bool:
    """Whether a document falls in the `data.heldout_fraction` carve-out: the first 8 bytes of the
    BLAKE2b digest of its UTF-8 text, read as a fraction of 2^64, lie below `fraction` (the same on
    every machine and process, unlike Python's hash)."""
    raw = text.encode("utf-8", errors="replace") if isinstance(text, str) else bytes(text or b"")
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big") < fraction * 2**64


def load_documents(cfg: DataConfig, stats: Counter, split: str | None = None):
    """A `datasets.Dataset` (or `IterableDataset` when streaming) with a "text" column. With
    `cfg.heldout_fraction` > 0, `cfg.split` without its carve-out, or any other split: the carve-out."""
    split = split or cfg.split
    if cfg.heldout_fraction > 0:
        heldout = split != cfg.split
        ds = load_documents(cfg.model_copy(update={"heldout_fraction": 0.0}), stats, cfg.split)
        return ds.filter(lambda row: heldout_document(row["text"], cfg.heldout_fraction) == heldout)
    source = cfg.source
    if source == DEFAULT_CORPUS:
        corpus = default_corpus_dir()
        if not corpus.exists():
            raise FileNotFoundError(f"default corpus not prepared at {corpus}; run `rntp prepare-data`")
        source = str(corpus / f"{'heldout' if split in ('heldout', 'test', 'validation') else 'train'}.jsonl")
    path = Path(source).expanduser()
    column = cfg.text_column
    if path.exists():
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
            if cfg.streaming:
                ds = ds.to_iterable_dataset()
        else:
            files = _local_files(path)
            if files[0].endswith(".parquet"):
                ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=cfg.streaming)
            else:
                column = "text"
                if cfg.streaming:
                    ds = datasets.IterableDataset.from_generator(
                        read_text_files, gen_kwargs={"files": files, "text_column": cfg.text_column, "stats": stats})
                else:
                    ds = datasets.Dataset.from_list(list(read_text_files(files, cfg.text_column, stats)))
                    if len(ds) == 0:
                        raise ValueError(f"no documents could be read from {path} ({dict(stats)})")
    elif source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"data source does not exist: {source}")
    else:  # a hub dataset name (needs network access, or datasets' cache)
        hub_name(source, "data.source")
        try:
            ds = datasets.load_dataset(source, cfg.subset, split=split, streaming=cfg.streaming)
        except Exception as e:  # the hub client's traceback says little; one line says what was tried
            offline = " with HF_HUB_OFFLINE=1" if hub_offline() else ""
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FileNotFoundError(f"data.source={source!r} is neither a local path nor reachable as a hub "
                                    f"dataset{offline} ({first})") from None
    names = ds.column_names if ds.column_names is not None else [column]
    if column not in names:
        raise ValueError(f"text column {column!r} not in {source} (columns: {names})")
    return ds.select_columns([column]).rename_column(column, "text") if column != "text" else ds


class PositionStream:
    """Yields positions forever (epoch after epoch). `state()` / `load_state()` give an exact
    cursor; positions of a chunk depend only on (seed, epoch, document, chunk)."""

    def __init__(self, cfg: DataConfig, tokenizer, rank: int = 0, world_size: int = 1, split: str | None = None,
                 entropy_fn: Callable[[list[int]], torch.Tensor] | None = None):
        """`entropy_fn(chunk)` gives the next-token entropy at every position of a chunk; it is
        required by the "entropy" position policy and should come from a fixed model, so that
        positions stay a function of (seed, data) and resume exactly."""
        if cfg.position_policy == "entropy" and entropy_fn is None:
            raise ValueError("data.position_policy=entropy needs a model to measure entropy (entropy_fn)")
        self.cfg, self.tokenizer, self.rank, self.world_size = cfg, tokenizer, rank, world_size
        self.entropy_fn = entropy_fn if cfg.position_policy == "entropy" else None
        self.stats: Counter = Counter()
        self.docs = load_documents(cfg, self.stats, split)
        self.streaming = isinstance(self.docs, datasets.IterableDataset)
        if self.streaming and world_size > 1:
            # Each rank reads only its share: whole shards when they divide among the ranks, else
            # every world_size-th document. (A map-style dataset is in memory: ranks take doc % world.)
            self.docs = split_dataset_by_node(self.docs, rank=rank, world_size=world_size)
        self.epoch = self.doc = self.chunk = self.pos = 0  # the next position to yield
        self._stream: dict | None = None  # streaming: datasets' cursor, shuffle buffer, document in progress
        self.docs_read = 0  # documents pulled from a streamed source by this process (what a resume costs)
        self._it: Iterator[Position] | None = None

    def state(self) -> dict:
        return {"epoch": self.epoch, "doc": self.doc, "chunk": self.chunk, "pos": self.pos,
                "stats": dict(self.stats), "stream": self._stream}

    def load_state(self, state: dict) -> None:
        self.epoch, self.doc, self.chunk, self.pos = (state[k] for k in ("epoch", "doc", "chunk", "pos"))
        self.stats.clear()  # in place: a streamed text reader counts into this very Counter
        self.stats.update(state.get("stats", {}))
        self._stream = state.get("stream")
        if self.streaming and self._stream is None and (self.doc, self.chunk, self.pos) != (0, 0, 0):
            log.warning("this data cursor has no streamed-reader state (an older checkpoint): the stream "
                        "restarts at the beginning of epoch %d", self.epoch)
            self.doc = self.chunk = self.pos = 0
        self._it = None

    def _streamed_docs(self, epoch: int) -> Iterator[tuple[int, str]]:
        """This rank's share of a streamed corpus through a seeded shuffle buffer. The state saved
        with each document (datasets' own iterator state, the buffer, the RNG, the document in
        progress) lets a resume continue exactly without re-reading what was consumed: datasets
        skips the consumed shards and rows, the buffer comes back from the checkpoint."""
        cfg, world, rank = self.cfg, self.world_size, self.rank
        saved = self._stream if self._stream and self._stream["epoch"] == epoch else None
        self.docs.set_epoch(epoch)  # a state loaded for another epoch does not apply to this one
        rng = np.random.default_rng([cfg.seed, epoch, rank])
        buffer: list[tuple[int, str]] = []
        next_id, ds_state = 0, None
        if saved:
            self.docs.load_state_dict(saved["ds"])
            rng.bit_generator.state = saved["rng"]
            buffer = [(int(d), t) for d, t in saved["buffer"]]
            next_id, ds_state = saved["next_id"], saved["ds"]
            yield saved["current"][0], saved["current"][1]  # the document in progress, from its saved chunk
        rows = iter(self.docs)

        def pull() -> tuple[int, str] | None:
            nonlocal next_id, ds_state
            if cfg.max_docs and next_id * world + rank >= cfg.max_docs:
                return None
            row = next(rows, None)
            if row is None:
                return None
            self.docs_read += 1
            ds_state = self.docs.state_dict()
            next_id += 1
            return (next_id - 1) * world + rank, row["text"]  # ids stay distinct across ranks

        size = cfg.shuffle_buffer if cfg.shuffle else 1
        while len(buffer) < size and (doc := pull()) is not None:
            buffer.append(doc)
        while buffer:
            i = int(rng.integers(len(buffer)))
            doc = buffer[i]
            new = pull()
            if new is None:
                buffer.pop(i)
            else:
                buffer[i] = new
            self._stream = {"epoch": epoch, "ds": ds_state, "rng": rng.bit_generator.state,
                            "buffer": [list(d) for d in buffer], "next_id": next_id, "current": list(doc)}
            yield doc
        self._stream = None

    def _ordered_docs(self, epoch: int, start: int) -> Iterator[tuple[int, str]]:
        cfg = self.cfg
        if self.streaming:
            yield from self._streamed_docs(epoch)
            return
        n = min(len(self.docs), cfg.max_docs or len(self.docs))
        order = np.random.default_rng([cfg.seed, epoch]).permutation(n) if cfg.shuffle else np.arange(n)
        for i in range(start, n):
            yield i, self.docs[int(order[i])]["text"]

    def chunks_of(self, text: str) -> list[list[int]]:
        cfg = self.cfg
        count = self.epoch == 0  # count skips once, on the first pass
        if text is not None and (not isinstance(text, str) or looks_binary(text)):
            self.stats["binary_docs"] += count  # bytes or a binary blob in the text column
            return []
        ids = self.tokenizer.encode(text, add_special_tokens=False) if text and text.strip() else []
        if not ids:
            self.stats["empty_docs"] += count
            return []
        chunks = [ids[i : i + cfg.chunk_tokens] for i in range(0, len(ids), cfg.chunk_tokens)]
        chunks = [c for c in chunks if len(c) >= cfg.min_context + cfg.horizon]
        if not chunks:
            self.stats["short_docs"] += count
        return chunks

    def positions_in(self, chunk: list[int], epoch: int, doc: int, index: int) -> list[int]:
        cfg = self.cfg
        candidates = np.arange(cfg.min_context, len(chunk) - cfg.horizon + 1)
        if self.entropy_fn is not None:  # keep positions in the chunk's entropy quantile range
            entropy = self.entropy_fn(chunk).numpy()[candidates]
            lo, hi = np.quantile(entropy, self.cfg.entropy_quantiles)
            candidates = candidates[(entropy >= lo) & (entropy <= hi)]
        rng = np.random.default_rng([cfg.seed, epoch, doc, index])
        k = min(cfg.positions_per_chunk, len(candidates))
        return sorted(int(p) for p in rng.choice(candidates, size=k, replace=False))

    def _generate(self) -> Iterator[Position]:
        while True:
            whole_epoch = (self.doc, self.chunk, self.pos) == (0, 0, 0)
            yielded = False
            for doc, text in self._ordered_docs(self.epoch, self.doc):
                if doc % self.world_size != self.rank:
                    continue  # each rank owns every world_size-th document
                for ci, chunk in enumerate(self.chunks_of(text)):
                    if doc == self.doc and ci < self.chunk:
                        continue
                    positions = self.positions_in(chunk, self.epoch, doc, ci)
                    frozen = tuple(chunk)
                    for pi, p in enumerate(positions):
                        if doc == self.doc and ci == self.chunk and pi < self.pos:
                            continue
                        # Advance the cursor past this position before handing it out.
                        self.doc, self.chunk, self.pos = doc, ci, pi + 1
                        yielded = True
                        yield Position(frozen, p, self.cfg.horizon, doc, ci, self.epoch)
                    self.doc, self.chunk, self.pos = doc, ci + 1, 0
                self.doc, self.chunk, self.pos = doc + 1, 0, 0
            if whole_epoch and not yielded:
                raise ValueError(f"data source {self.cfg.source} yields no usable positions "
                                 f"(rank {self.rank}; skipped so far: {dict(self.stats)})")
            self.epoch, self.doc, self.chunk, self.pos = self.epoch + 1, 0, 0, 0

    def problem(self, max_docs: int = 10_000) -> str | None:
        """Why this rank would get no position, or None: reads documents until the first usable
        chunk (at most `max_docs`), without moving the cursor or counting. Run before any model
        loads, so bad data is one clear line instead of an error at step 1."""
        cfg, stats = self.cfg, Counter(self.stats)
        need = cfg.min_context + cfg.horizon
        try:
            if self.streaming:
                docs = (row["text"] for row in self.docs)
            else:
                n = min(len(self.docs), cfg.max_docs or len(self.docs))
                docs = (self.docs[i]["text"] for i in range(self.rank, n, self.world_size))
            for seen, text in enumerate(docs):
                if seen >= max_docs:
                    break
                if isinstance(text, str) and not looks_binary(text) and \
                        len(self.tokenizer.encode(text, add_special_tokens=False)) >= need:
                    return None
        finally:  # a streamed reader counts skipped lines as it reads; this look-ahead must not
            skipped = {k: v for k, v in self.stats.items() if v}
            self.stats.clear()
            self.stats.update(stats)
        return (f"data source {cfg.source} yields no usable positions for rank {self.rank}: no document it read "
                f"has data.min_context + data.horizon = {need} tokens (skipped: {skipped or 'nothing'})")

    def take(self, n: int) -> list[Position]:
        if self._it is None:
            self._it = self._generate()
        return [next(self._it) for _ in range(n)]

    def first_epoch(self, n: int) -> list[Position]:
        """Up to n positions from one pass over the data (for evaluation: no repeats)."""
        out: list[Position] = []
        while len(out) < n:
            p = self.take(1)[0]
            if p.epoch > 0:
                break
            out.append(p)
        return out
