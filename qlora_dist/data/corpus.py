"""The training corpus of a run: records read and validated once, mapped to examples, tokenized (and
packed) into a cache keyed by a fingerprint of the data, the tokenizer and the settings. Rank 0 builds
the cache; the other ranks wait for it and read the same file (memory-mapped Arrow, via `datasets`).

data.dataset is one dataset or a mixture (a list, config.DatasetEntry): the datasets' examples are
concatenated in order, each dataset's taken round(weight x its examples) times (seeded), and counted and
reported per dataset.

The cache is built streaming, so rank 0's memory is bounded by a batch, not the dataset: examples are
tokenized WRITE_BATCH at a time and appended to an Arrow file (datasets' ArrowWriter); weights and packing
then read that file memory-mapped (packing plans from the lengths column alone, batches.pack_bins) and
write the final one. Columns: `input_ids` (uint16 where the vocabulary fits, else int32), `trained` (a
bit per token: the label is the token, else IGNORE_INDEX; chat rows have several masked spans), `length`,
and for packed rows `segments` (each example's token count: the position ids restart there).

Bad rows never reach the training loop: each is skipped and counted by reason, or with data.strict
the run stops before training with an error naming the file, line and field.
"""
from __future__ import annotations

import collections
import errno
import hashlib
import itertools
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from qlora_dist import atomic
from qlora_dist.config import Config, DatasetEntry
from qlora_dist.data import records
from qlora_dist.data.batches import (IGNORE_INDEX, TokenizedExample, builtin_examples, drop_skipped, pack, pack_bins,
                                     show_row, tokenize_all)
from qlora_dist.data.formats import FORMATS, SKIP_REASONS, Example, RowError, detect
from qlora_dist.data.tasks import TaskItem
from qlora_dist.data.workers import WorkerPool
from qlora_dist.errors import ConfigError, RunFault
from qlora_dist import dist

CACHE_VERSION = 3  # bump when reading, tokenization, packing or the stored columns change what a cache holds
# (3: CSV empty cells are "", not missing; a JSON-lines BOM is not a bad row; over-long lines skipped unread;
# the fingerprint hashes every byte, report.json records the rows file's size and hash)
DETECT_ROWS = 1000  # records read to find a readable one and detect the format (here and in the preflight)
WRITE_BATCH = 4096  # examples tokenized (rows packed) and written at a time: what rank 0 holds while building
ROWS_FILE = "rows.arrow"
HASH_ROWS = 1000  # rows per window of content_sha256 (datasets.config.DEFAULT_MAX_BATCH_SIZE, version 1's)
# More than this share of a dataset's records skipped for one cause (reason and field) is a warning, not just a
# count: it is rarely bad rows, more often a reader or a format that misreads the data (an empty CSV cell read
# as missing once dropped 54 of 100 Alpaca rows).
SKIP_WARN_SHARE = 0.05


@dataclass
class LoadReport:
    source: str
    format: str
    records: int = 0
    examples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    first_skip: str | None = None  # "where: why" of the first skipped row
    causes: dict[str, list] = field(default_factory=dict)  # "reason in 'field'" -> [rows, where the first]
    key: str = "data.dataset"  # data.dataset[i] in a mixture
    weight: float = 1.0
    taken: int | None = None  # examples in the training data after the weight (round(weight x examples))
    parts: list[LoadReport] = field(default_factory=list)  # a mixture's: one per dataset, in order

    def summary(self) -> str:
        if self.parts:
            return "\n".join([*(p.summary() for p in self.parts),
                              f"data: mixture of {len(self.parts)} datasets: {self.records:,} records -> "
                              f"{self.examples:,} examples (after weights); skipped: {self._skips()}"])
        weighted = f", weight {self.weight:g} -> {self.taken:,}" if self.weight != 1 and self.taken is not None else ""
        where = "data" if self.key == "data.dataset" else self.key
        return (f"{where} {self.source} (format {self.format}): {self.records:,} records -> {self.examples:,} "
                f"examples{weighted}; skipped: {self._skips()}" + (f" (first: {self.first_skip})" if self.first_skip else ""))

    def _skips(self) -> str:
        return ", ".join(f"{k} {v:,}" for k, v in self.skipped.items() if v) or "none"

    def skip(self, where: str, err: RowError, strict: bool) -> None:
        """Count a bad row, or stop the run on it (data.strict)."""
        if strict:
            raise ConfigError([f"{where}: {err} (data.strict=true: fix the row, or set "
                               "data.strict=false to skip and count bad rows)"])
        self.skipped[err.reason] = self.skipped.get(err.reason, 0) + 1
        self.first_skip = self.first_skip or f"{where}: {err}"
        cause = self.causes.setdefault(err.reason + (f" in {err.field!r}" if err.field else ""), [0, where])
        cause[0] += 1

    def warnings(self) -> list[str]:
        """A line for each cause of skips over SKIP_WARN_SHARE of the records (a mixture's: its datasets')."""
        if self.parts:
            return [w for p in self.parts for w in p.warnings()]
        return [f"{n:,} of {self.records:,} rows ({n / self.records:.0%}) skipped as {cause} (first: {where})"
                for cause, (n, where) in self.causes.items() if n > SKIP_WARN_SHARE * self.records]


def total(parts: list[LoadReport]) -> LoadReport:
    """One dataset's report, or a mixture's: its datasets' counts summed (examples: after the weights)."""
    if len(parts) == 1:
        return parts[0]
    return LoadReport(", ".join(p.source for p in parts), "+".join(dict.fromkeys(p.format for p in parts)),
                      records=sum(p.records for p in parts),
                      examples=sum(p.examples if p.taken is None else p.taken for p in parts),
                      skipped={k: sum(p.skipped.get(k, 0) for p in parts) for k in SKIP_REASONS},
                      first_skip=next((p.first_skip for p in parts if p.first_skip), None), parts=parts)


def format_of(source: records.Source, first: dict | None) -> str:
    if source.format:
        return source.format
    found = detect(records.columns_of(first), first)
    if found is None:
        cols = sorted(records.columns_of(first))
        key = "data.format" if source.key == "data.dataset" else f"{source.key}: format"
        raise ConfigError([f"{key}: cannot tell the format of {source.name} from its columns {cols}; "
                           f"set it to one of {', '.join(FORMATS)}"])
    return found


def open_dataset(entry: DatasetEntry, cfg: Config, limit: int | None = None) -> tuple[LoadReport, Iterator[tuple[str, Example]]]:
    """A dataset's report (its format detected) and its examples as (where, example), in file order, as
    they are read; bad rows are counted into the report as the stream passes them. `limit` stops after
    that many records (previews); data.max_examples caps the examples."""
    source = records.resolve(entry.path, entry.format, entry.key)
    stream = records.read(source, cfg.data.max_row_chars)
    head = list(itertools.islice(stream, DETECT_ROWS))
    first = next((r.data for r in head if isinstance(r.data, dict)), None)
    report = LoadReport(source.name, format_of(source, first), skipped={k: 0 for k in SKIP_REASONS},
                        key=entry.key, weight=entry.weight)
    return report, _examples(itertools.islice(itertools.chain(head, stream), limit), report, cfg.data)


def _examples(stream, report: LoadReport, d) -> Iterator[tuple[str, Example]]:
    to_examples, kept = FORMATS[report.format].to_pairs, 0
    for rec in stream:
        report.records += 1
        try:
            if isinstance(rec.data, RowError):
                raise rec.data
            mapped = to_examples(rec.data)
            for ex in mapped:
                if len(ex.source) + len(ex.target) > d.max_row_chars:
                    raise RowError("too_long", None, f"{len(ex.source) + len(ex.target):,} characters > "
                                                     f"data.max_row_chars {d.max_row_chars:,}")
        except RowError as err:
            report.skip(rec.where, err, d.strict)
            continue
        for ex in mapped[:d.max_examples - kept] if d.max_examples else mapped:
            yield rec.where, ex
        kept += len(mapped)
        if d.max_examples and kept >= d.max_examples:
            return


def no_examples(report: LoadReport) -> ConfigError:
    return ConfigError([f"{report.key}: {report.source} gave no usable example ({report.summary()})"])


def read_examples(cfg: Config, limit: int | None = None) -> tuple[list[Example], LoadReport]:
    """Every dataset's examples in memory, concatenated in order (before a mixture's weights, which the
    cache applies), and what was skipped. For previews, tests and small data: the cache streams."""
    examples, parts = [], []
    for entry in cfg.data.entries():
        report, stream = open_dataset(entry, cfg, limit)
        mine = [ex for _, ex in stream]
        report.examples = len(mine)
        if not mine:
            raise no_examples(report)
        examples += mine
        parts.append(report)
    return examples, total(parts)


def mixture_indices(counts: list[int], weights: list[float], seed: int) -> np.ndarray | None:
    """Positions, in the concatenation of datasets of `counts` examples, of the examples a mixture trains
    on (config.DatasetEntry): dataset i's all floor(w) times, then a seeded sample of the rest of
    round(w x n), in file order. None when every weight is 1 (everything once)."""
    if all(w == 1 for w in weights):
        return None
    out, start = [], 0
    for i, (n, w) in enumerate(zip(counts, weights)):
        whole, rest = divmod(round(w * n), n)
        extra = np.sort(np.random.default_rng([seed, i]).choice(n, size=rest, replace=False))
        out += [np.tile(np.arange(n), whole) + start, extra + start]
        start += n
    return np.concatenate(out).astype(np.int64)


# --------------------------------------------------------------------------------------------- cache
def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    special = f"{tokenizer.bos_token}|{tokenizer.eos_token}|{tokenizer.pad_token}"
    return hashlib.sha256((text + special).encode()).hexdigest()[:16]


def fingerprint(cfg: Config, tokenizer) -> str:
    """Every dataset of data.dataset (its content or size and time, its format and weight), the tokenizer
    and the settings that change the rows."""
    d = cfg.data
    sources = [[records.resolve(e.path, e.format, e.key).fingerprint(), e.format, e.weight] for e in d.entries()]
    settings = {k: getattr(d, k) for k in ("source_max_len", "target_max_len", "train_on_source", "packing",
                                           "pack_length", "max_row_chars", "max_examples", "strict",
                                           "chat_template")}
    if d.packing or any(e.weight != 1 for e in d.entries()):
        settings["seed"] = cfg.train.seed  # the packing order, the weights' samples
    text = json.dumps([CACHE_VERSION, sources, tokenizer_fingerprint(tokenizer), settings], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def pack_length(cfg: Config) -> int:
    return cfg.data.pack_length or cfg.data.source_max_len + cfg.data.target_max_len


def tokenize_examples(examples: list[Example], tokenizer, cfg: Config,
                      report: LoadReport | None = None) -> list[TokenizedExample]:
    """Examples in memory -> training rows (tokenized, packed as configured); the cache's reference."""
    rows = drop_skipped(tokenize_all(examples, tokenizer, cfg), report.skipped if report else {})
    if report is not None:  # conversations whose first exchange is longer than a row ('too_long')
        report.examples = len(rows)
        if not rows:
            raise no_examples(report)
    return pack(rows, pack_length(cfg), cfg.train.seed) if cfg.data.packing else rows


def _tokenize_batch(examples: list[Example], tokenizer, cfg: Config, token_type):
    """A batch of examples -> (the cache's columns of its rows, [(index, skip reason)] of those that
    tokenization rejected). A ConfigError is returned, not raised: it cannot cross a process boundary."""
    try:
        rows = tokenize_all(examples, tokenizer, cfg)
    except ConfigError as err:
        return err.problems, []
    skips = [(j, r.skip) for j, r in enumerate(rows) if r.skip is not None]
    return _to_table([r for r in rows if r.skip is None], token_type), skips


class _Tokenizers:
    """Tokenizes a stream's batches in order: in this process for the first SERIAL_BATCHES (small data
    never starts a worker), then in forked worker processes (data/workers.py: they end, whatever happens),
    one per core of this process (up to 8), one batch in flight per worker (memory stays bounded by
    batches, not the dataset)."""

    SERIAL_BATCHES = 2

    def __init__(self, tokenizer, cfg: Config, token_type):
        self.args, self.pool = (tokenizer, cfg, token_type), None
        self.workers = min(len(os.sched_getaffinity(0)), 8)

    def __enter__(self) -> "_Tokenizers":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.__exit__(*exc)

    def map(self, batches: Iterator[list]) -> Iterator[tuple]:
        batches = iter(batches)
        for batch in itertools.islice(batches, self.SERIAL_BATCHES if self.workers > 1 else None):
            yield (batch, *_tokenize_batch([ex for _, ex in batch], *self.args))
        first = next(batches, None)
        if first is None:  # small data: no worker started
            return
        pending: collections.deque = collections.deque()
        for result in self._pool().map(_examples_of(itertools.chain([first], batches), pending)):
            yield (pending.popleft(), *result)

    def _pool(self) -> WorkerPool:
        if self.pool is None:
            # fork: the workers inherit the tokenizer and config; the Rust tokenizer's own threads are off
            # in them (tokenizers disables them after a fork, and says so unless the variable is set).
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            self.pool = WorkerPool(self.workers, _tokenize_batch, self.args, what="tokenizing worker")
        return self.pool


def _examples_of(batches: Iterator[list], sent: collections.deque) -> Iterator[list[Example]]:
    """Each batch's examples for the workers; the batch (with its `where`s) kept in `sent` for its result."""
    for batch in batches:
        sent.append(batch)
        yield [ex for _, ex in batch]


# ------------------------------------------------------------------------------ compact Arrow columns
def _token_type(vocab: int):
    import pyarrow as pa

    return pa.uint16() if vocab <= 2**16 else pa.int32()


def _schema(token_type, packed: bool):
    import pyarrow as pa

    fields = [("input_ids", pa.list_(token_type)), ("trained", pa.list_(pa.bool_())), ("length", pa.int32())]
    return pa.schema(fields + ([("segments", pa.list_(pa.int32()))] if packed else []))


def _to_table(rows: list[TokenizedExample], token_type):
    """Rows -> the cache's columns; a label must be its token or IGNORE_INDEX (tokenization makes no other)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = pa.array([r.input_ids for r in rows], type=pa.list_(token_type))
    labels = pa.array([r.labels for r in rows], type=pa.list_(pa.int32())).flatten()
    trained = pc.not_equal(labels, IGNORE_INDEX)
    if pc.any(pc.and_(trained, pc.not_equal(labels, ids.flatten().cast(pa.int32())))).as_py():
        raise AssertionError("a label that is neither its token nor IGNORE_INDEX cannot be stored as a mask")
    columns = {"input_ids": ids, "trained": pa.ListArray.from_arrays(ids.offsets, trained),
               "length": pc.list_value_length(ids).cast(pa.int32())}
    if rows and rows[0].position_ids is not None:  # packed: where the position ids restart
        columns["segments"] = pa.array([_segments(r.position_ids) for r in rows], type=pa.list_(pa.int32()))
    return pa.table(columns)


def _segments(positions: list[int]) -> list[int]:
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    return [b - a for a, b in zip(starts, starts[1:])]


def _packed_table(members, sizes: list[int], length: int, token_type):
    """Packed rows from their member rows (in order; row k has the next sizes[k]) as batches._concat makes
    them: each member cut to `length` tokens, its first label masked, position ids restarting."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ids, trained = members.column("input_ids").combine_chunks(), members.column("trained").combine_chunks()
    n = pc.list_value_length(ids).to_numpy().astype(np.int64)
    flat_ids = ids.flatten().to_numpy()
    flat_trained = trained.flatten().to_numpy(zero_copy_only=False).copy()
    keep = np.minimum(n, length)
    if (n > length).any():
        cut = np.arange(len(flat_ids)) - np.repeat(np.cumsum(n) - n, n) < length
        flat_ids, flat_trained = flat_ids[cut], flat_trained[cut]
    flat_trained[(np.cumsum(keep) - keep)[keep > 0]] = False
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    row_tokens = np.add.reduceat(keep, bounds[:-1])
    offsets = pa.array(np.concatenate([[0], np.cumsum(row_tokens)]), type=pa.int32())
    return pa.table({"input_ids": pa.ListArray.from_arrays(offsets, pa.array(flat_ids, type=token_type)),
                     "trained": pa.ListArray.from_arrays(offsets, pa.array(flat_trained)),
                     "length": pa.array(row_tokens, type=pa.int32()),
                     "segments": pa.ListArray.from_arrays(pa.array(bounds, type=pa.int32()),
                                                          pa.array(keep, type=pa.int32()))})


class TokenizedRows:
    """Tokenized training rows, indexable; backed by a `datasets.Dataset` (memory-mapped from the cache)."""

    def __init__(self, table):
        self.table = table

    @classmethod
    def from_rows(cls, rows: list[TokenizedExample]) -> "TokenizedRows":
        datasets = records.datasets_lib()
        vocab = 1 + max((t for r in rows for t in r.input_ids), default=0)
        return cls(datasets.Dataset(_to_table(rows, _token_type(vocab))))

    @classmethod
    def from_file(cls, path: Path) -> "TokenizedRows":
        return cls(records.datasets_lib().Dataset.from_file(str(path)))

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int | slice) -> TokenizedExample | list[TokenizedExample]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        row = self.table[int(i)]
        ids = row["input_ids"]
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, row["trained"])]
        positions = [p for n in row["segments"] for p in range(n)] if "segments" in row else None
        return TokenizedExample(ids, labels, positions)

    def lengths(self) -> list[int]:
        return list(self.table["length"])

    def content_sha256(self) -> str:
        """sha256 over the rows' tokens and labels, in order: what the run trains on, independent of the
        data's path and modification time (unlike the cache `fingerprint`, which may key on both: a job
        that copies its data to node-local scratch on every requeue has the same content here). Hashed
        per HASH_ROWS rows as int64, whatever the file's chunks: the value version 1 caches (int64 columns
        in datasets' 1,000-row record batches) gave, so their checkpoints resume on a rebuilt cache."""
        import pyarrow as pa
        import pyarrow.compute as pc

        h, table = hashlib.sha256(), self.table.data
        for start in range(0, len(self), HASH_ROWS):
            window = table.slice(start, HASH_ROWS)
            ids = window.column("input_ids").combine_chunks()
            flat = ids.flatten().cast(pa.int64())
            trained = window.column("trained").combine_chunks().flatten()
            labels = pc.if_else(trained, flat, pa.scalar(IGNORE_INDEX, pa.int64()))
            for values in (flat, labels):
                h.update(pc.list_value_length(ids).cast(pa.int64()).to_numpy(zero_copy_only=False).tobytes())
                h.update(values.to_numpy(zero_copy_only=False).tobytes())
        return h.hexdigest()


# ------------------------------------------------------------------------------------ streaming build
def _writer(path: Path, schema):
    return records.datasets_lib().arrow_writer.ArrowWriter(schema=schema, path=str(path))


def _write_examples(cfg: Config, tokenizer, path: Path) -> list[LoadReport]:
    """Every dataset's examples, tokenized WRITE_BATCH at a time and appended to one Arrow file
    (unpacked, unweighted, in dataset order); one report per dataset."""
    token_type, parts = _token_type(len(tokenizer)), []
    budget = cfg.data.source_max_len + cfg.data.target_max_len
    with _writer(path, _schema(token_type, packed=False)) as writer, _Tokenizers(tokenizer, cfg, token_type) as tok:
        for entry in cfg.data.entries():
            start = time.perf_counter()
            report, stream = open_dataset(entry, cfg)
            batches = iter(lambda: list(itertools.islice(stream, WRITE_BATCH)), [])
            for batch, table, skips in tok.map(batches):
                if isinstance(table, list):
                    raise ConfigError(table)
                for j, reason in skips:
                    report.skip(batch[j][0], RowError(reason, None, f"does not fit a row of {budget} tokens"),
                                cfg.data.strict)
                report.examples += table.num_rows
                writer.write_table(table)
            if not report.examples:
                raise no_examples(report)
            dist.log(f"{entry.key}: {report.records:,} records read, validated and tokenized in "
                     f"{time.perf_counter() - start:.1f} s")
            parts.append(report)
        writer.finalize()
    return parts


def _finish(cfg: Config, raw_path: Path, out_path: Path, parts: list[LoadReport], token_type) -> int:
    """The training rows from the tokenized examples: a mixture's weights applied, packed as configured.
    Reads `raw_path` memory-mapped, writes `out_path`; returns the number of rows."""
    import pyarrow as pa

    select = mixture_indices([p.examples for p in parts], [p.weight for p in parts], cfg.train.seed)
    for p in parts:
        p.taken = round(p.weight * p.examples)
    if select is None and not cfg.data.packing:
        os.replace(raw_path, out_path)
        return sum(p.examples for p in parts)
    with pa.memory_map(str(raw_path)) as source:
        raw = pa.ipc.open_stream(source).read_all()
        with _writer(out_path, _schema(token_type, cfg.data.packing)) as writer:
            if cfg.data.packing:
                lengths = raw.column("length").to_numpy()
                bins = pack_bins((lengths if select is None else lengths[select]).tolist(), pack_length(cfg),
                                 cfg.train.seed)
                for k in range(0, len(bins), WRITE_BATCH):
                    chunk = bins[k:k + WRITE_BATCH]
                    members = np.fromiter(itertools.chain.from_iterable(chunk), dtype=np.int64)
                    members = members if select is None else select[members]
                    writer.write_table(_packed_table(raw.take(members), [len(b) for b in chunk],
                                                     pack_length(cfg), token_type))
                rows = len(bins)
            else:
                for k in range(0, len(select), WRITE_BATCH):
                    writer.write_table(raw.take(select[k:k + WRITE_BATCH]))
                rows = len(select)
            writer.finalize()
    raw_path.unlink()
    return rows


def _write_cache(cfg: Config, tokenizer, folder: Path) -> dict:
    """Fill `folder` with the training rows (ROWS_FILE) and report.json (with the rows file's size and
    hash, which `damage` checks on every later open); returns the report."""
    start = time.perf_counter()
    parts = _write_examples(cfg, tokenizer, folder / "examples.arrow")
    rows = _finish(cfg, folder / "examples.arrow", folder / ROWS_FILE, parts, _token_type(len(tokenizer)))
    report = total(parts)
    dist.log(f"{rows:,} training rows{' (packed)' if cfg.data.packing else ''} written in "
             f"{time.perf_counter() - start:.1f} s")
    out = {**asdict(report), "rows": rows, "summary": report.summary(), "warnings": report.warnings(),
           "rows_file": _integrity(folder / ROWS_FILE),
           "built_by": {"rank": dist.read_env().rank, "pid": os.getpid()}}
    (folder / "report.json").write_text(json.dumps(out, indent=1))
    return out


# ------------------------------------------------------------------------ a cache that verifies itself
def _integrity(rows_file: Path) -> dict:
    """What `damage` compares: the size and an xxh3_128 of every byte (~0.2 s per 300 MB, records.py)."""
    import xxhash  # a dependency (pyproject.toml); datasets requires it too

    return {"bytes": rows_file.stat().st_size, "xxh3_128": records.file_hash(rows_file, xxhash.xxh3_128())}


def damage(path: Path) -> str | None:
    """Why the cache folder `path` cannot be used ("absent" if it was never built), or None if it is
    complete and its rows file is the one its report.json describes (a truncated or altered rows.arrow
    gave a pyarrow traceback naming no path on every run, and was never rebuilt)."""
    try:
        recorded = json.loads((path / "report.json").read_text())["rows_file"]
    except FileNotFoundError:
        return "absent"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"report.json unreadable or without an integrity record ({type(exc).__name__})"
    rows_file = path / ROWS_FILE
    if not rows_file.is_file():
        return f"{ROWS_FILE} is missing"
    if rows_file.stat().st_size != recorded.get("bytes"):
        return f"{ROWS_FILE} has {rows_file.stat().st_size:,} bytes, report.json says {recorded.get('bytes'):,}"
    if _integrity(rows_file) != recorded:
        return f"{ROWS_FILE}'s content differs from its hash in report.json"
    return None


def _remove_stale(root: Path, fp: str) -> None:
    """Under the fingerprint's lock (so nobody is building it): the temporary folders of builds of it
    that were killed (atomic.folder's `.tmp-<fp>-<pid>`), and the state files of dead jobs on this host."""
    for tmp in root.glob(f".tmp-{fp}-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for state in root.glob(f".{fp}.*-*"):
        host, _, pid = state.name.rpartition("-")
        if host.endswith(f".{socket.gethostname()}") and pid.isdigit() and not dist.pid_alive(int(pid)):
            state.unlink(missing_ok=True)


def _ensure_cache(cfg: Config, tokenizer, path: Path) -> None:
    """Rank 0: the cache folder `path` intact on return, built or rebuilt if needed, under a lock per
    fingerprint: a second job building the same cache waits for the first, then uses its cache."""
    from filelock import FileLock, Timeout  # a dependency (pyproject.toml), as for writer_lock

    (path.parent / ".locks").mkdir(exist_ok=True)  # lock files stay (removing one races a waiter): kept apart
    lock = FileLock(str(path.parent / ".locks" / f"{path.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        dist.log(f"another run is building the tokenized-data cache {path} ({lock.lock_file} is held): waiting for it")
        lock.acquire()
    try:
        _remove_stale(path.parent, path.name)
        problem = damage(path)
        if problem is None:
            return
        if problem != "absent":
            dist.log(f"the tokenized-data cache {path} is damaged ({problem}): rebuilding it")
        _build_cache(cfg, tokenizer, path)
    finally:
        lock.release()


def _build_cache(cfg: Config, tokenizer, path: Path) -> None:
    """Write the cache folder atomically: a temporary folder renamed into place when complete (replacing
    a damaged one). A full disk is one line naming the folder."""
    dist.log(f"reading, validating and tokenizing {', '.join(e.path for e in cfg.data.entries())} ...")
    try:
        with atomic.folder(path, replace=True) as tmp:
            _write_cache(cfg, tokenizer, tmp)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) and "No space left" not in str(exc):
            raise
        raise RunFault(f"data.cache_dir: cannot write the tokenized-data cache {path}: "
                       f"{exc.strerror or 'No space left on device'} ({shutil.disk_usage(path.parent).free / 2**20:,.0f} "
                       "MiB free there); free space or point data.cache_dir at a larger disk") from None


def _state(state: Path) -> bool:
    """A waiting rank's view of rank 0's work: True when done; rank 0's error raised here."""
    try:
        text = state.read_text()
    except OSError:
        return False
    if text.startswith("failed: "):
        raise ConfigError([f"rank 0 failed to prepare the data: {text[len('failed: '):]}"])
    return text == "ok"


def cached_rows(cfg: Config, tokenizer, info, root: Path) -> tuple[TokenizedRows, dict]:
    """The dataset's tokenized rows from the cache under `root` (RunPaths.data_cache). Rank 0 checks the
    cache (`damage`) and builds it if needed; the other ranks wait for its verdict in this job's state file
    (`.<fp>.<host>-<pid>` of rank 0), which rank 0 touches while it works: dist.wait_for ends their wait
    within dist.timeout_s if rank 0 dies. The fingerprint is rank 0's (one hash of the data, not one per rank)."""
    fp, job = dist.broadcast_object((fingerprint(cfg, tokenizer), f"{socket.gethostname()}-{os.getpid()}")
                                    if info.is_main else None, what="agree on the data's fingerprint")
    path, state = root / fp, root / f".{fp}.{job}"
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        try:
            with dist.heartbeat(state):
                _ensure_cache(cfg, tokenizer, path)
        except Exception as exc:  # the waiting ranks read it (a dead job's is removed by _remove_stale)
            if info.world_size > 1:
                atomic.write_text(state, f"failed: {exc}")
            else:
                state.unlink(missing_ok=True)
            raise
        atomic.write_text(state, "ok")
    else:
        dist.wait_for(lambda: _state(state), f"build or check the tokenized-data cache {path}", state,
                      cfg.dist.timeout_s)
    dist.barrier("open the tokenized-data cache")
    if info.is_main:
        state.unlink(missing_ok=True)
    report = json.loads((path / "report.json").read_text())
    return TokenizedRows.from_file(path / ROWS_FILE), {**report, "cache": str(path)}


def prepare(cfg: Config, tokenizer, info, cache_root: Path) -> tuple[TokenizedRows, list[TaskItem], dict | None]:
    """(training rows, held-out built-in items, data report) on every rank."""
    if cfg.data.dataset != "builtin":
        rows, report = cached_rows(cfg, tokenizer, info, cache_root)
        return rows, [], report
    data = None
    if info.is_main:  # generated and tokenized in a second; shared rather than cached
        examples, held_out = builtin_examples(cfg)
        data = (tokenize_examples(examples, tokenizer, cfg), held_out)
    rows, held_out = dist.broadcast_object(data)
    return TokenizedRows.from_rows(rows), held_out, None


def preview(cfg: Config, tokenizer, n: int) -> str:
    """What `qlora-dist data preview` prints: the first n examples of each dataset as the model will see
    them (mapped source and target, token and masked-label counts), then the skip counts and totals of the
    whole data, built as the cache is (in a temporary folder)."""
    d, lines, entries = cfg.data, [], cfg.data.entries()
    for entry in entries:
        _, stream = open_dataset(entry, cfg)
        for i, (_, ex) in enumerate(itertools.islice(stream, n)):
            row = tokenize_all([ex], tokenizer, cfg)[0]
            masked = sum(1 for label in row.labels if label == IGNORE_INDEX)
            lines += [f"--- {entry.key + ' ' if len(entries) > 1 else ''}example {i + 1}: {len(row.input_ids)} "
                      f"tokens, {masked} masked labels, {len(row.input_ids) - masked} trained"]
            lines += ([f"[{d.chat_template} template, trained spans in [[ ]]] {show_row(row, tokenizer)!r}"]
                      if ex.messages else [f"[source] {ex.source!r}", f"[target] {ex.target!r}"])
    with tempfile.TemporaryDirectory(prefix="qlora-dist-preview-") as tmp:
        report = _write_cache(cfg, tokenizer, Path(tmp))
        tokens = sum(TokenizedRows.from_file(Path(tmp) / ROWS_FILE).lengths())
    lines += ["---", report["summary"], *(f"warning: {w}" for w in report["warnings"]),
              f"{report['rows']:,} training rows{' (packed)' if d.packing else ''}, {tokens:,} tokens, "
              f"source_max_len {d.source_max_len}, target_max_len {d.target_max_len}, "
              f"train_on_source {str(d.train_on_source).lower()}"]
    return "\n".join(lines)
