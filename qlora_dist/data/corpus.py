"""The training corpus of a run: records read and validated once, mapped to examples, tokenized (and
packed) into a cache keyed by a fingerprint of the data, the tokenizer and the settings. Rank 0 builds
the cache; the other ranks wait for it and read the same files (memory-mapped Arrow, via `datasets`).

Bad rows never reach the training loop: each is skipped and counted by reason, or with data.strict
the run stops before training with an error naming the file, line and field.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qlora_dist import atomic
from qlora_dist.config import Config
from qlora_dist.data import records
from qlora_dist.data.batches import TokenizedExample, builtin_examples, pack, tokenize_all
from qlora_dist.data.formats import FORMATS, SKIP_REASONS, Example, RowError, detect
from qlora_dist.data.tasks import TaskItem
from qlora_dist.errors import ConfigError
from qlora_dist.launch import dist

CACHE_VERSION = 1  # bump when tokenization or packing changes what a cache holds
DETECT_ROWS = 1000  # records read to find a readable one and detect the format (here and in the preflight)


@dataclass
class LoadReport:
    source: str
    format: str
    records: int = 0
    examples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    first_skip: str | None = None  # "where: why" of the first skipped row

    def summary(self) -> str:
        skips = ", ".join(f"{k} {v:,}" for k, v in self.skipped.items() if v) or "none"
        return (f"data {self.source} (format {self.format}): {self.records:,} records -> {self.examples:,} "
                f"examples; skipped: {skips}" + (f" (first: {self.first_skip})" if self.first_skip else ""))


def format_of(source: records.Source, first: dict | None) -> str:
    if source.format:
        return source.format
    found = detect(records.columns_of(first), first)
    if found is None:
        cols = sorted(records.columns_of(first))
        raise ConfigError([f"data.format: cannot tell the format of {source.name} from its columns {cols}; "
                           f"set data.format to one of {', '.join(FORMATS)}"])
    return found


def read_examples(cfg: Config, limit: int | None = None) -> tuple[list[Example], LoadReport]:
    """The dataset's examples in file order, and what was skipped. `limit` stops after that many records
    (previews); data.max_examples caps the examples kept."""
    d = cfg.data
    source = records.resolve(d.dataset, d.format)
    stream = records.read(source)
    head = list(itertools.islice(stream, DETECT_ROWS))
    first = next((r.data for r in head if isinstance(r.data, dict)), None)
    report = LoadReport(source.name, format_of(source, first), skipped={k: 0 for k in SKIP_REASONS})
    to_examples, examples = FORMATS[report.format].to_pairs, []
    for rec in itertools.islice(itertools.chain(head, stream), limit):
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
            if d.strict:
                raise ConfigError([f"{rec.where}: {err} (data.strict=true: fix the row, or set "
                                   "data.strict=false to skip and count bad rows)"]) from None
            report.skipped[err.reason] += 1
            report.first_skip = report.first_skip or f"{rec.where}: {err}"
            continue
        examples += mapped
        if d.max_examples and len(examples) >= d.max_examples:
            examples = examples[:d.max_examples]
            break
    report.examples = len(examples)
    if not examples:
        raise ConfigError([f"data.dataset: {source.name} gave no usable example ({report.summary()})"])
    return examples, report


# --------------------------------------------------------------------------------------------- cache
def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    special = f"{tokenizer.bos_token}|{tokenizer.eos_token}|{tokenizer.pad_token}"
    return hashlib.sha256((text + special).encode()).hexdigest()[:16]


def fingerprint(cfg: Config, tokenizer) -> str:
    d = cfg.data
    source = records.resolve(d.dataset, d.format)
    settings = {k: getattr(d, k) for k in ("format", "source_max_len", "target_max_len", "train_on_source",
                                           "packing", "pack_length", "max_row_chars", "max_examples", "strict")}
    if d.packing:
        settings["seed"] = cfg.train.seed  # the packing order
    text = json.dumps([CACHE_VERSION, source.fingerprint(), tokenizer_fingerprint(tokenizer), settings], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def pack_length(cfg: Config) -> int:
    return cfg.data.pack_length or cfg.data.source_max_len + cfg.data.target_max_len


def tokenize_examples(examples: list[Example], tokenizer, cfg: Config) -> list[TokenizedExample]:
    rows = tokenize_all(examples, tokenizer, cfg)
    return pack(rows, pack_length(cfg), cfg.train.seed) if cfg.data.packing else rows


class TokenizedRows:
    """Tokenized training rows, indexable; backed by a `datasets.Dataset` (memory-mapped from the cache)."""

    def __init__(self, table):
        self.table = table

    @classmethod
    def from_rows(cls, rows: list[TokenizedExample]) -> "TokenizedRows":
        datasets = records.datasets_lib()
        columns = {"input_ids": [r.input_ids for r in rows], "labels": [r.labels for r in rows],
                   "length": [len(r.input_ids) for r in rows]}
        if rows and rows[0].position_ids is not None:
            columns["position_ids"] = [r.position_ids for r in rows]
        return cls(datasets.Dataset.from_dict(columns))

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int | slice) -> TokenizedExample | list[TokenizedExample]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        row = self.table[int(i)]
        return TokenizedExample(row["input_ids"], row["labels"], row.get("position_ids"))

    def lengths(self) -> list[int]:
        return list(self.table["length"])

    def content_sha256(self) -> str:
        """sha256 over the rows' tokens and labels, in order: what the run trains on, independent of the
        data's path and modification time (unlike the cache `fingerprint`, which may key on both: a job
        that copies its data to node-local scratch on every requeue has the same content here)."""
        import pyarrow as pa

        h = hashlib.sha256()
        for batch in self.table.data.to_batches(max_chunksize=65536):
            for column in ("input_ids", "labels"):
                lists = batch.column(column)
                h.update(lists.value_lengths().cast(pa.int64()).to_numpy(zero_copy_only=False).tobytes())
                h.update(lists.flatten().cast(pa.int64()).to_numpy(zero_copy_only=False).tobytes())
        return h.hexdigest()


def _build_cache(cfg: Config, tokenizer, path: Path) -> None:
    """Write the cache folder atomically: a temporary folder renamed into place when complete."""
    dist.log(f"reading and validating {cfg.data.dataset} ...")
    examples, report = read_examples(cfg)
    start = time.perf_counter()
    rows = tokenize_examples(examples, tokenizer, cfg)
    dist.log(f"tokenized {len(examples):,} examples{' and packed them' if cfg.data.packing else ''} in "
             f"{time.perf_counter() - start:.1f} s")
    with atomic.folder(path) as tmp:
        TokenizedRows.from_rows(rows).table.save_to_disk(str(tmp / "rows"))
        (tmp / "report.json").write_text(json.dumps({**asdict(report), "rows": len(rows), "summary": report.summary(),
                                                     "built_by": {"rank": dist.read_env().rank, "pid": os.getpid()}},
                                                    indent=1))


def _wait_for(path: Path, failed: Path, poll_s: float = 0.5) -> None:
    """Other ranks wait on the file system, not on a collective: building a large dataset can take
    longer than the collective timeout (dist.timeout_s)."""
    while not (path / "report.json").is_file():
        if failed.is_file():
            raise ConfigError([f"rank 0 failed to prepare the data: {failed.read_text()}"])
        time.sleep(poll_s)


def cached_rows(cfg: Config, tokenizer, info, root: Path) -> tuple[TokenizedRows, dict]:
    """The dataset's tokenized rows from the cache under `root` (RunPaths.data_cache), built once by rank 0."""
    datasets = records.datasets_lib()
    path = root / fingerprint(cfg, tokenizer)
    failed = root / f"{path.name}.failed"
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        failed.unlink(missing_ok=True)
    dist.barrier()
    if info.is_main and not (path / "report.json").is_file():
        try:
            _build_cache(cfg, tokenizer, path)
        except Exception as exc:
            failed.write_text(str(exc))
            raise
    elif not info.is_main:
        _wait_for(path, failed)
    dist.barrier()
    report = json.loads((path / "report.json").read_text())
    return TokenizedRows(datasets.load_from_disk(str(path / "rows"))), {**report, "cache": str(path)}


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
    """What `qlora-dist data preview` prints: the first n examples as the model will see them (mapped
    source and target, token and masked-label counts), then the skip counts of the whole dataset."""
    examples, report = read_examples(cfg)
    d, lines = cfg.data, []
    for i, ex in enumerate(examples[:n]):
        row = tokenize_all([ex], tokenizer, cfg)[0]
        masked = sum(1 for label in row.labels if label == -100)
        lines += [f"--- example {i + 1}: {len(row.input_ids)} tokens, {masked} masked labels, "
                  f"{len(row.input_ids) - masked} trained",
                  f"[source] {ex.source!r}", f"[target] {ex.target!r}"]
    rows = tokenize_examples(examples, tokenizer, cfg)
    tokens = sum(len(r.input_ids) for r in rows)
    lines += ["---", report.summary(),
              f"{len(rows):,} training rows{' (packed)' if d.packing else ''}, {tokens:,} tokens, "
              f"source_max_len {d.source_max_len}, target_max_len {d.target_max_len}, "
              f"train_on_source {str(d.train_on_source).lower()}"]
    return "\n".join(lines)
