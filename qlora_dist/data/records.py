"""Raw records of a dataset, each with where it came from (file:line, or file row N), read offline.

Sources: a named dataset (see formats.DATASETS) from the HF datasets cache; a local file (.json with a
JSON array, .json/.jsonl JSON lines, optionally .gz; .csv; .tsv; .parquet); a local folder (a
`save_to_disk` folder, or a folder of such files).

JSON lines are read here line by line rather than through `datasets`' json builder: that builder
(datasets 5.2) turns one non-UTF-8 or malformed line into a pyarrow error for the whole file, with no
line number, where we must skip and count that line. A line is read with a bound (line_limit: a line
longer than any row data.max_row_chars allows is skipped as too_long in chunks, never held whole), and
a UTF-8 byte-order mark (an editor's or Excel's "UTF-8 with BOM") is not part of the data. Everything
else goes through `datasets`.
"""
from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from qlora_dist import compat
from qlora_dist.data.formats import DATASETS, HEADERLESS_COLUMNS, RowError
from qlora_dist.errors import ConfigError

TABLE_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
# A row's line may hold this many bytes per character data.max_row_chars allows: a character takes up to 4
# bytes in UTF-8 and 6 (12 for a surrogate pair) as a JSON \u escape, and a line also holds the keys and
# fields no example uses. Longer lines are skipped as too_long unread.
LINE_BYTES_PER_CHAR = 8
DISCARD_CHUNK = 1 << 20  # bytes read at a time while skipping the rest of an over-long line
# Parsing a JSON array whole holds the bytes, the decoded text and the Python objects: the RSS of the
# preflight's parse grew 3.5x the file for Alpaca records (194 MiB -> +671 MiB), more for records of a few
# short fields. A file needing more than the memory available is refused (_check_json_array_fits).
JSON_ARRAY_MEMORY_FACTOR = 6


@dataclass(frozen=True)
class Record:
    where: str  # "file:line" or "file row N": what an error message names
    data: dict | RowError  # the parsed record, or why it could not be read


@dataclass(frozen=True)
class Source:
    """A resolved dataset: what to read, and how (kind: jsonl | json-array | table | hub | disk)."""
    name: str
    kind: str
    paths: tuple[Path, ...]
    format: str | None  # known from the dataset name, else detected from the columns
    headerless: tuple[str, ...] | None = None
    key: str = "data.dataset"  # the config key that names it (data.dataset[i] in a mixture): errors say it

    def fingerprint(self) -> str:
        """A hash of every byte of every file (its path, size and content), so that a file edited in place
        with its size and time kept (cp -p, rsync -t, touch -r) is new data. Until issue 23 files over
        256 MB were keyed by size and time only, and such an edit trained on the old cache's rows.
        Why hashing every byte up front is cheap enough: xxh3_128 (xxhash)
        hashed a 300 MB file in 0.17 s, reading it alone 0.15 s (sha256 0.58 s, blake2b 0.97 s; page
        cache warm, 2 shared cores); tokenizing that file takes ~2 minutes (issue 23: 300,000 rows,
        129 MB in 53 s), so on a cache miss the extra pass is ~0.2% (cold, one extra read, after which
        the tokenizer reads from the page cache), and on a hit it is the check a reused cache needs."""
        import xxhash  # a dependency (pyproject.toml); datasets requires it too

        h = hashlib.sha256(f"{self.name}|{self.kind}".encode())
        for p in self.paths:
            for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
                if f.is_file():
                    h.update(f"{f}|{f.stat().st_size}|{file_hash(f, xxhash.xxh3_128())}|".encode())
        return h.hexdigest()[:16]


def file_hash(path: Path, hasher) -> str:
    """`hasher` (hashlib-like) over the file's bytes, read in 4 MiB pieces."""
    with path.open("rb") as fh:
        while piece := fh.read(1 << 22):
            hasher.update(piece)
    return hasher.hexdigest()


def datasets_lib():
    """The `datasets` module, without its per-call progress bars (rank 0's tqdm bar is the run's one)."""
    import datasets

    datasets.disable_progress_bars()
    return datasets


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in (".jsonl.gz", ".json.gz") if name.endswith(s)), path.suffix.lower())


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _is_json_array(path: Path) -> bool:
    with _open(path) as fh:
        head = fh.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()
    return head.startswith(b"[")


def line_limit(max_row_chars: int) -> int:
    """The longest line (bytes) of JSON lines read for a run with this data.max_row_chars."""
    return LINE_BYTES_PER_CHAR * max_row_chars


def resolve(dataset: str, data_format: str | None, key: str = "data.dataset") -> Source:
    """Where `data.dataset` points: a named dataset, a file or a folder."""
    path = Path(dataset).expanduser()
    headerless = HEADERLESS_COLUMNS.get(data_format or "")
    if path.is_file():
        suffix = _suffix(path)
        if suffix in JSON_SUFFIXES:
            kind = "json-array" if _is_json_array(path) else "jsonl"
        elif suffix in TABLE_SUFFIXES:
            kind = "table"
        else:
            raise ConfigError([f"{key}: {path}: unsupported file type {suffix!r}; use .json, .jsonl, .json.gz, "
                               ".jsonl.gz, .csv, .tsv, .parquet or a folder"])
        return Source(str(path), kind, (path,), data_format, headerless, key)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            return Source(str(path), "disk", (path,), data_format, key=key)
        files = sorted(f for f in path.iterdir() if f.is_file() and _suffix(f) in (*JSON_SUFFIXES, *TABLE_SUFFIXES))
        if not files:
            raise ConfigError([f"{key}: folder {path} holds no .json/.jsonl/.csv/.tsv/.parquet file"])
        kinds = {("json-array" if _is_json_array(f) else "jsonl") if _suffix(f) in JSON_SUFFIXES else "table"
                 for f in files}
        if len(kinds) > 1:
            raise ConfigError([f"{key}: folder {path} mixes file kinds ({', '.join(sorted(kinds))}); use one"])
        return Source(str(path), kinds.pop(), tuple(files), data_format, headerless, key)
    if dataset in DATASETS:
        return Source(dataset, "hub", (), data_format or DATASETS[dataset][1], key=key)
    raise ConfigError([f"{key}: {dataset!r} is neither a file, a folder nor a known dataset "
                       f"({', '.join(sorted(DATASETS))})"])


def read(source: Source, max_row_chars: int) -> Iterator[Record]:
    """Every record of the source, in order; unreadable ones carry a RowError instead of data.
    `max_row_chars` (data.max_row_chars) bounds the lines of JSON lines that are read at all."""
    readers = {"jsonl": _read_jsonl, "json-array": _read_json_array, "table": _read_table}
    if source.kind in readers:
        for path in source.paths:
            yield from readers[source.kind](path, source.headerless, line_limit(max_row_chars))
        return
    dataset = _load_hub(source) if source.kind == "hub" else _load_disk(source)
    for i, row in enumerate(dataset):
        yield Record(f"{source.name} row {i + 1}", dict(row))


def _lines(path: Path, limit: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, line, its length in bytes) of every non-blank line; the line is None when it is longer
    than `limit` bytes: its rest is then read DISCARD_CHUNK at a time and dropped, so memory stays bounded
    by `limit` whatever the file holds (a 2 GB one-line file peaked at 3.3x the line read whole)."""
    with _open(path) as fh:
        number = 0
        while raw := fh.readline(limit + 1):
            number += 1
            if len(raw) <= limit or raw.endswith(b"\n"):
                if raw.strip():
                    yield number, raw, len(raw)
                continue
            size = len(raw)
            while not raw.endswith(b"\n") and (raw := fh.readline(DISCARD_CHUNK)):
                size += len(raw)
            yield number, None, size


def _read_jsonl(path: Path, _headerless, limit: int) -> Iterator[Record]:
    for number, raw, size in _lines(path, limit):
        where = f"{path}:{number}"
        if raw is None:
            yield Record(where, RowError("too_long", None, f"a line of {size:,} bytes, over {limit:,} "
                                         f"({LINE_BYTES_PER_CHAR} x data.max_row_chars): not read"))
            continue
        try:
            line = raw.decode("utf-8-sig")  # a byte-order mark is no part of the first record
        except UnicodeDecodeError as exc:
            yield Record(where, RowError("non_utf8", None, f"byte {exc.start} is not UTF-8"))
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            yield Record(where, RowError("bad_json", None, exc.msg))
            continue
        yield Record(where, value if isinstance(value, dict) else RowError("wrong_type", None, "not a JSON object"))


def _read_json_array(path: Path, _headerless, _limit) -> Iterator[Record]:
    """A JSON array file is parsed whole: a syntax error stops the run, naming the line."""
    _check_json_array_fits(path)
    with _open(path) as fh:
        raw = fh.read()
    try:
        rows = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError([f"{path}:{line}: not UTF-8 (byte {exc.start}); a JSON array file cannot skip rows"])
    except json.JSONDecodeError as exc:
        raise ConfigError([f"{path}:{exc.lineno}: not valid JSON: {exc.msg}"])
    del raw
    if not isinstance(rows, list):
        raise ConfigError([f"{path}: expected a JSON array of records or JSON lines"])
    for i, value in enumerate(rows):
        where = f"{path} record {i + 1}"
        yield Record(where, value if isinstance(value, dict) else RowError("wrong_type", None, "not a JSON object"))


def _check_json_array_fits(path: Path) -> None:
    """Refuse, naming the way out, a JSON array too large to parse in the memory available (rather than
    let the OOM killer end the run)."""
    size = path.stat().st_size
    if path.name.endswith(".gz"):  # gzip's trailer holds the uncompressed size modulo 2**32
        with open(path, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            size = max(size, int.from_bytes(fh.read(4), "little"))
    available = _available_memory()
    if available is not None and size * JSON_ARRAY_MEMORY_FACTOR > available:
        raise ConfigError([f"{path}: a JSON array is parsed whole, and this one ({size / 2**30:.1f} GiB) needs "
                           f"about {size * JSON_ARRAY_MEMORY_FACTOR / 2**30:.1f} GiB of memory, "
                           f"{available / 2**30:.1f} GiB available; convert it to JSON lines, which are read "
                           f"row by row: jq -c '.[]' {path} > {path.name.split('.')[0]}.jsonl"])


def _available_memory() -> int | None:
    """Bytes this process may still allocate: the kernel's MemAvailable, or less under a cgroup (v2) limit;
    None where neither can be read."""
    found = []
    try:
        meminfo = Path("/proc/meminfo").read_text()
        found.append(int(next(ln.split()[1] for ln in meminfo.splitlines() if ln.startswith("MemAvailable:"))) * 1024)
    except (OSError, StopIteration, ValueError):
        pass
    try:
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def _read_table(path: Path, headerless: tuple[str, ...] | None, _limit) -> Iterator[Record]:
    datasets = datasets_lib()
    builder = TABLE_SUFFIXES[path.suffix.lower()]
    # datasets 5.2's csv builder reads with pandas (3.1) read_csv, whose default NA detection turns an empty
    # cell, and the texts "NA", "None", "null", "nan", ..., into None: a missing field. Every column we read
    # is text, where an empty cell is an empty string (Alpaca's no-input rows) and "None" a valid answer.
    kwargs = {"na_filter": False} if builder == "csv" else {}
    if path.suffix.lower() == ".tsv":
        kwargs["delimiter"] = "\t"
    if headerless and builder == "csv":
        kwargs.update(column_names=list(headerless), header=None)
    elif path.suffix.lower() == ".tsv" and not headerless:
        raise ConfigError([f"{path}: .tsv files are read with data.format=flan-cot (no header); for a table "
                           "with a header use .csv"])
    table = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    first_data_line = 1 if headerless or builder != "csv" else 2
    for i, row in enumerate(table):
        where = f"{path}:{i + first_data_line}" if builder == "csv" else f"{path} row {i + 1}"
        yield Record(where, dict(row))


def _load_hub(source: Source):
    """A named dataset, offline: from the HF datasets cache (a earlier `load_dataset` of it), else from a
    downloaded copy of its hub repository in the HF hub cache (`huggingface-cli download --repo-type
    dataset ...`). Never the network."""
    datasets = datasets_lib()
    compat.force_hub_offline()
    hub_id = DATASETS[source.name][0]
    kwargs = {"data_files": "unified_chip2.jsonl"} if source.name == "chip2" else {}
    try:
        return datasets.load_dataset(hub_id, split="train", **kwargs)
    except Exception:  # datasets raises several types for "not cached"; all mean: try the hub cache
        pass
    from huggingface_hub import snapshot_download

    try:
        # HF_HUB_CACHE read now, not when huggingface_hub was imported (transformers imports it early).
        folder = snapshot_download(hub_id, repo_type="dataset", local_files_only=True,
                                   cache_dir=os.environ.get("HF_HUB_CACHE"))
    except Exception as exc:
        raise ConfigError([f"{source.key}: {source.name!r} ({hub_id}) is neither in the HF datasets cache nor in "
                           f"the HF hub cache, and this run is offline ({type(exc).__name__}); point "
                           f"{source.key} at a local file or folder of it instead"]) from None
    return datasets.load_dataset(folder, split="train", **kwargs)


def _load_disk(source: Source):
    datasets = datasets_lib()
    loaded = datasets.load_from_disk(str(source.paths[0]))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ConfigError([f"{source.key}: {source.name} has splits {list(loaded)} and no 'train'"])
        loaded = loaded["train"]
    return loaded


def columns_of(first: dict | None) -> set[str]:
    return set(first) if isinstance(first, dict) else set()


# --------------------------------------------------------------------------------- cheap look (preflight)
def _sample_table(path: Path, headerless: tuple[str, ...] | None, n: int) -> list[Record]:
    """The first n rows of a .parquet/.csv/.tsv without converting the whole file (datasets would)."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        batch = next(pq.ParquetFile(path).iter_batches(batch_size=n), None)
        return [Record(f"{path} row {i + 1}", row) for i, row in enumerate(batch.to_pylist() if batch else [])]
    import itertools

    first = 1 if headerless else 2
    rows = itertools.islice(_csv_rows(path, headerless), n)
    return [Record(f"{path}:{i + first}", row) for i, row in enumerate(rows)]


def _csv_rows(path: Path, headerless: tuple[str, ...] | None) -> Iterator[dict]:
    """The records of a .csv/.tsv as the csv module parses them: a quoted cell may span lines (so lines are
    not records), a byte-order mark is not part of the first column's name, empty cells are ""."""
    import csv

    # the csv module refuses cells over 131,072 characters by default; data.max_row_chars judges rows here
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    with path.open(newline="", encoding="utf-8-sig") as f:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        yield from csv.DictReader(f, fieldnames=list(headerless) if headerless else None, delimiter=delimiter)


def _count_table(path: Path, headerless: tuple[str, ...] | None) -> int:
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return sum(1 for _ in _csv_rows(path, headerless))


def _count_jsonl(path: Path, limit: int) -> int:
    return sum(1 for _ in _lines(path, limit))


def look(source: Source, max_row_chars: int, n: int = 1000) -> tuple[list[Record], int]:
    """(the first n records, the number of records) of a file source, cheaply: JSON lines are counted by
    lines (an over-long one skipped unread), CSV by the csv module's records, parquet from its footer; a
    JSON array is parsed (its syntax is checked that way). Named datasets and save_to_disk folders are
    opened (memory-mapped) to count. Unreadable files raise ConfigError naming the file."""
    import itertools

    try:
        if source.kind == "jsonl":
            head = list(itertools.islice(read(source, max_row_chars), n))
            return head, sum(_count_jsonl(p, line_limit(max_row_chars)) for p in source.paths)
        if source.kind == "table":
            head = [r for p in source.paths for r in _sample_table(p, source.headerless, n)][:n]
            return head, sum(_count_table(p, source.headerless) for p in source.paths)
        if source.kind == "json-array":
            rows = list(read(source, max_row_chars))
            return rows[:n], len(rows)
        dataset = _load_hub(source) if source.kind == "hub" else _load_disk(source)
        return [Record(f"{source.name} row {i + 1}", dict(dataset[i])) for i in range(min(n, len(dataset)))], len(dataset)
    except ConfigError:
        raise
    except Exception as exc:  # pyarrow, csv, gzip and OS errors all mean: this file cannot be read
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError([f"{source.key}: {source.name}: cannot be read ({detail})"]) from None
