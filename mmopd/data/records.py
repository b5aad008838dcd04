"""Records from where users keep them, checked with errors that name the row.

A source is a JSONL file (read line by line, so errors name `file:line` and rows may differ in shape), or
anything `datasets` reads: a JSON, parquet or CSV file, a `save_to_disk` folder, or a hub id. `data.fields`
renames the set's columns onto record fields, and TRL's conversational records (`messages`, or `prompt` /
`completion` lists of messages) become a `prompt` list of messages and an `answer`.

Records stay in the source (a memory-mapped arrow table, or byte offsets into the JSONL file): loading checks
every row once in a streaming pass and keeps only the indices of the rows it skipped, and `Records[i]` reads
and checks its row again when a batch asks for it. A million arrow rows cost no per-row memory here (a JSONL
file costs its offset and line-number arrays, 16 bytes a row); the step order (`mmopd.data.step_order`) is computed,
not stored.
"""

from __future__ import annotations

import array
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger("mmopd")

# rows per record batch of the arrow cache `datasets` writes when it converts a set: an open table holds about 2 KB
# of metadata per batch (datasets' default of 1,000 rows a batch made that 2 bytes a row), and a batch is
# memory-mapped, so its size costs no memory. It never merges the batches the reader yields (a parquet row group).
WRITER_BATCH_ROWS = 100_000
BUILDERS = {".json": "json", ".parquet": "parquet", ".csv": "csv"}  # file suffix -> the `datasets` reader
ROLES = ("system", "user", "assistant", "tool")
# a role's split key and its default (mmopd.config.DataConfig): a source without splits serves only the default
SPLIT_KEYS = {"data.train": ("data.split", "train"), "data.eval": ("data.eval_split", "test")}

Check = Callable[[dict, Path], dict]


class DataError(ValueError):
    """Bad input data, with the file and line (or row) to fix."""


class RecordError(ValueError):
    """One record that cannot be used; the caller adds the file and line."""


class JsonLines:
    """A JSONL file as rows: the byte offset and line number of every non-empty line (two int64 arrays, grown
    as C arrays so a million lines never become a million Python ints)."""

    def __init__(self, path: Path):
        self.name, self.base_dir, self.path = str(path), path.parent, path
        offsets, lines, position = array.array("q"), array.array("q"), 0
        with path.open("rb") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    offsets.append(position)
                    lines.append(lineno)
                position += len(line)
        self.offsets = np.frombuffer(offsets, dtype=np.int64)  # [N]
        self.lines = np.frombuffer(lines, dtype=np.int64)  # [N]

    def __len__(self) -> int:
        return len(self.offsets)

    def where(self, i: int) -> str:
        return f"{self.path}:{self.lines[i]}"

    def raw(self, i: int) -> Any:
        with self.path.open("rb") as f:
            f.seek(int(self.offsets[i]))
            return json.loads(f.readline())

    def scan(self) -> Iterator[Any]:
        """Every row in order, parsed lazily (a bad line raises when its turn comes)."""
        with self.path.open("rb") as f:
            for line in f:
                if line.strip():
                    yield lambda line=line: json.loads(line)


class ArrowRows:
    """A `datasets.Dataset` as rows, with pictures kept as encoded bytes (or paths) for the adapters to check."""

    def __init__(self, table: datasets.Dataset, name: str, base_dir: Path):
        for column, feature in table.features.items():
            undecoded = _undecoded(feature)
            if undecoded != feature:
                table = table.cast_column(column, undecoded)
        self.table, self.name, self.base_dir = table, name, base_dir

    def __len__(self) -> int:
        return len(self.table)

    def where(self, i: int) -> str:
        return f"{self.name} row {i}"

    def raw(self, i: int) -> Any:
        return self.table[int(i)]

    def scan(self) -> Iterator[Any]:
        for batch in self.table.iter(batch_size=1024):
            columns = list(batch)
            for j in range(len(batch[columns[0]]) if columns else 0):
                yield lambda j=j, batch=batch: {c: batch[c][j] for c in columns}


Rows = JsonLines | ArrowRows


def _undecoded(feature: Any) -> Any:
    """The feature with every `Image` left undecoded ({"bytes", "path"}), so a bad picture is a checkable row."""
    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False)
    if isinstance(feature, datasets.List):
        return datasets.List(_undecoded(feature.feature), length=feature.length)
    if isinstance(feature, list):
        return [_undecoded(f) for f in feature]
    if isinstance(feature, dict):
        return {k: _undecoded(f) for k, f in feature.items()}
    return feature


def conversation(raw: dict) -> dict:
    """TRL's conversational forms as `prompt` (a list of messages) and `answer`: `messages` ending in an assistant
    turn is the prompt before it and that answer (without one, all of it is the prompt); `prompt` / `completion`
    lists of messages likewise; a plain `completion` string is the answer. Other records pass unchanged. A prompt
    that still ends with an assistant turn is refused: that turn is an answer the models would read as prompt."""
    out = dict(raw)
    if out.get("messages") is not None:
        messages = _messages(out.pop("messages"), "messages")
        if messages[-1]["role"] == "assistant":
            if len(messages) == 1:
                raise RecordError("'messages' holds only an assistant turn; put the prompt's turns before it")
            messages, out["answer"] = messages[:-1], text_of(messages[-1], "the last assistant turn")
        out["prompt"] = messages
    elif isinstance(out.get("prompt"), list):
        out["prompt"] = _messages(out["prompt"], "prompt")
    completion = out.pop("completion", None)
    if isinstance(completion, list):
        turns = _messages(completion, "completion")
        if turns[-1]["role"] != "assistant":
            raise RecordError(f"'completion' must end with an assistant turn, got a {turns[-1]['role']!r} turn")
        out["answer"] = text_of(turns[-1], "the completion")
    elif completion is not None:
        out["answer"] = completion
    if isinstance(out.get("prompt"), list) and out["prompt"][-1]["role"] == "assistant":
        raise RecordError("'prompt' ends with an assistant turn, so the answer would be in the prompt the models "
                          "read; end the prompt with the user's turn and give the answer as 'completion' (or as the "
                          "one last assistant turn of 'messages')")
    return out


def _messages(value: Any, name: str) -> list[dict]:
    """A checked list of {role, content} messages, with arrow's empty part fields (None) dropped."""
    if not isinstance(value, list) or not value:
        raise RecordError(f"'{name}' must be a non-empty list of {{role, content}} messages, got {value!r:.60}")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES or "content" not in message:
            raise RecordError(f"'{name}'[{i}] must be a {{role, content}} message with role one of "
                              f"{', '.join(ROLES)}, got {message!r:.80}")
        content = message["content"]
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") in ("text", "image") for p in content):
                raise RecordError(f"'{name}'[{i}] content parts must be {{\"type\": \"text\", \"text\": ...}} or "
                                  f"{{\"type\": \"image\"}}, got {content!r:.80}")
            content = [{k: v for k, v in p.items() if v is not None} for p in content]
        elif not isinstance(content, str):
            raise RecordError(f"'{name}'[{i}] content must be a string or a list of parts, got "
                              f"{type(content).__name__}")
        out.append({"role": message["role"], "content": content})
    return out


def text_of(message: dict, what: str) -> str:
    """A message's text (its text parts joined by newlines); a picture in it is an error."""
    content = message["content"]
    if isinstance(content, str):
        return content
    if any(p["type"] == "image" for p in content):
        raise RecordError(f"{what} holds a picture; answers must be text")
    return "\n".join(p.get("text", "") for p in content)


def image_parts(messages: list[dict]) -> int:
    """How many `{"type": "image"}` parts the messages hold."""
    return sum(1 for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image")


class Records(Sequence):
    """The usable rows of a source as records, read and checked when indexed (slices give lists).

    Only the skipped rows are held (`skipped` [S], sorted row indices), so a set costs memory for its bad rows,
    not for all of them: record i is row i plus the number of skipped rows before that row.
    """

    def __init__(self, rows: Rows, skipped: np.ndarray, check: Check, fields: dict[str, str]):
        self.rows, self.skipped, self.check, self.fields = rows, skipped, check, fields
        self.usable_before = skipped - np.arange(len(skipped))  # [S] usable rows before each skipped row

    def __len__(self) -> int:
        return len(self.rows) - len(self.skipped)

    def row(self, i: int) -> int:
        """The source row of record i."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"record {i} of {len(self)}")
        i %= len(self)
        return i + int(np.searchsorted(self.usable_before, i, side="right"))

    def without(self, positions: list[int]) -> Records:
        """These records with the ones at `positions` skipped as well."""
        skipped = np.union1d(self.skipped, np.asarray([self.row(p) for p in positions], dtype=np.int64))
        return Records(self.rows, skipped.astype(np.int64), self.check, self.fields)

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row = self.row(i)
        return record_of(self.rows.raw(row), self.rows, row, self.check, self.fields)

    def __iter__(self) -> Iterator[dict]:
        return (self[j] for j in range(len(self)))

    def fingerprint(self, limit: int = 0) -> str:
        """A digest of the first `limit` records' source rows (all of them when 0), in order: two sets share it when
        they hold the same rows, wherever their files are."""
        return self._digest(range(min(limit, len(self)) if limit else len(self)), hashlib.sha256())

    def sample_fingerprint(self, rows: int = 4096) -> str:
        """A digest of the set's size and of `rows` records spread evenly over it, in order: it changes when a file
        is replaced by other rows, grown, cut or reordered, and costs the same on a million rows as on a thousand
        (an edit of one row between the sampled ones goes unseen)."""
        positions = np.unique(np.linspace(0, len(self) - 1, min(rows, len(self))).astype(np.int64))
        return self._digest((int(i) for i in positions), hashlib.sha256(f"{len(self)} records\n".encode()), _short)

    def _digest(self, positions: Iterator[int] | range, digest: Any, default: Callable[[Any], str] = repr) -> str:
        for i in positions:
            digest.update(json.dumps(self.rows.raw(self.row(i)), sort_keys=True, default=default).encode() + b"\n")
        return f"sha256:{digest.hexdigest()[:16]}"


def _short(value: Any) -> str:
    """A value JSON cannot hold, for a digest: encoded bytes (a picture) as their own digest, not a repr as long."""
    return hashlib.sha256(value).hexdigest() if isinstance(value, bytes) else repr(value)


def record_of(raw: Any, rows: Rows, row: int, check: Check, fields: dict[str, str]) -> dict:
    """One raw row as a checked record: columns renamed by `fields`, conversations unpacked, the adapter's check."""
    if not isinstance(raw, dict):
        raise RecordError(f"a record must be a JSON object, got {type(raw).__name__}")
    if fields:
        missing = [f"{column!r} (data.fields.{name})" for name, column in fields.items() if column not in raw]
        if missing:
            raise RecordError(f"no column {', '.join(missing)}; the set's columns are: {', '.join(map(str, raw))}")
        raw = {**raw, **{name: raw[column] for name, column in fields.items()}}
    record = check(conversation(raw), rows.base_dir)
    record["_where"] = rows.where(row)
    return record


@dataclass
class Dataset:
    path: str
    records: Records
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.records)

    def drop(self, positions: list[int]) -> None:
        """Skip the records at `positions` (and count them)."""
        self.records = self.records.without(positions)
        self.skipped += len(positions)


def open_rows(source: str | Path, role: str, split: str = "", subset: str = "") -> Rows:
    """The rows of a JSONL file, a file `datasets` reads, a save_to_disk folder, or a hub dataset's split (the role's
    default split when none is given)."""
    split = split or SPLIT_KEYS.get(role, ("data.split", "train"))[1]
    path = Path(source).expanduser()
    if path.is_file():
        _one_split(path, split, role)
    if path.is_file() and path.suffix == ".jsonl":
        return JsonLines(path)
    if path.is_file():
        if path.suffix not in BUILDERS:
            raise DataError(f"{role}: {path} is a {path.suffix or 'suffix-less'} file; give a .jsonl, .json, .parquet "
                            "or .csv file, a save_to_disk folder or a hub id")
        return ArrowRows(_read_file(path, role), str(path), path.parent)
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as err:
            raise DataError(f"{role}: {path} is a folder but not one written by datasets' save_to_disk: {err}") from err
        except (OSError, ValueError, datasets.exceptions.DatasetsError, pa.ArrowException) as err:  # a torn file
            raise DataError(f"{role}: {path} is a save_to_disk folder that cannot be read ({_said(err)}); write it "
                            "again with save_to_disk") from err
        if not isinstance(loaded, datasets.DatasetDict):
            _one_split(path, split, role)
        return ArrowRows(_split_of(loaded, split, f"{role}={path}", role), f"{path}[{split}]"
                         if isinstance(loaded, datasets.DatasetDict) else str(path), path)
    if path.suffix in (".jsonl", *BUILDERS) or str(source).startswith((".", "/", "~")):
        raise DataError(f"{role}: file not found: {path}")
    try:
        loaded = _converted(str(source), subset or None)
    except (ConnectionError, FileNotFoundError, ValueError, OSError, datasets.exceptions.DatasetsError) as err:
        raise DataError(f"{role}={source!r} is not a local file or folder, and loading it as a hub dataset failed "
                        f"({type(err).__name__}: {err}); check the id and the network (HF_HUB_OFFLINE must be "
                        "unset), or give a local file") from err
    name = f"{source}{'/' + subset if subset else ''}[{split}]"
    return ArrowRows(_split_of(loaded, split, f"{role}={source}", role), name, Path.cwd())


def _one_split(path: Path, split: str, role: str) -> None:
    """A source of one set (a file, a save_to_disk `Dataset`) is the split its role reads by default, and no other:
    reading all of it for another split would, for data.eval, evaluate on the training rows."""
    key, default = SPLIT_KEYS.get(role, ("data.split", "train"))
    if split != default:
        raise DataError(f"{role}: {path} is one set with no splits, so it has no split {split!r}; give that split's "
                        f"own file or a save_to_disk folder of splits, or unset {key}")


def _read_file(path: Path, role: str) -> datasets.Dataset:
    """A JSON, parquet or CSV file through `datasets`, whose readers fail inside its builder: their error (a CSV
    that does not parse, a parquet file with a schema and no rows) is one line naming the file and the cause."""
    if path.stat().st_size == 0 or (path.suffix == ".parquet" and _parquet_rows(path) == 0):
        what = "an empty file" if path.stat().st_size == 0 else "a parquet file with a schema and no rows"
        raise DataError(f"{role}: {path} holds no usable records ({what})")
    try:
        return _converted(BUILDERS[path.suffix], data_files=str(path), split="train")
    except ValueError as err:  # what `datasets` says of a file with no rows (a CSV of a header only)
        raise DataError(f"{role}: {path} holds no usable records ({err})") from err
    except (OSError, StopIteration, datasets.exceptions.DatasetsError, pa.ArrowException) as err:
        raise DataError(f"{role}: {path} cannot be read as a {BUILDERS[path.suffix]} file ({_said(err)}); fix the "
                        "file or give it as JSONL") from err


def _parquet_rows(path: Path) -> int | None:
    """The rows a parquet file's footer counts (None when it has no readable footer: `datasets` says why)."""
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowException):
        return None


def _said(err: BaseException) -> str:
    """The innermost error of a chain, as `Type: first line` (`datasets` wraps its readers' errors in
    DatasetGenerationError, whose own message names neither the file nor the cause)."""
    while err.__cause__ is not None or (err.__context__ is not None and not err.__suppress_context__):
        err = err.__cause__ or err.__context__
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


def _converted(path: str, name: str | None = None, split: str | None = None,
               **kwargs: Any) -> datasets.Dataset | datasets.DatasetDict:
    """`datasets.load_dataset`, with an arrow-based builder's cache (parquet, JSON, CSV) written in
    `WRITER_BATCH_ROWS` batches; a builder that yields examples one at a time (imagefolder) keeps its own batch
    size, as it holds a batch of examples in memory before writing it. The arrow memory a first load's conversion
    freed goes back to the system (pyarrow's allocator keeps it otherwise, for the whole run)."""
    builder = datasets.load_dataset_builder(path, name, **kwargs)
    if isinstance(builder, datasets.ArrowBasedBuilder):
        builder = datasets.load_dataset_builder(path, name, writer_batch_size=WRITER_BATCH_ROWS, **kwargs)
    builder.download_and_prepare()
    loaded = builder.as_dataset(split=split)
    pa.default_memory_pool().release_unused()
    return loaded


def _split_of(loaded: datasets.Dataset | datasets.DatasetDict, split: str, what: str, role: str) -> datasets.Dataset:
    if not isinstance(loaded, datasets.DatasetDict):
        return loaded
    if split not in loaded:
        option = SPLIT_KEYS.get(role, ("data.split", "train"))[0]
        raise DataError(f"{what} has no split {split!r}; its splits are {', '.join(loaded)} (set {option})")
    return loaded[split]


def load_records(source: str | Path, check: Check, skip_bad: bool = False, role: str = "data",
                 fields: dict[str, str] | None = None, split: str = "", subset: str = "") -> Dataset:
    """Open `source` and check every row once (`check(record, base_dir)`), keeping the usable rows' indices.

    A bad row raises DataError naming its file and line (or row), or with `skip_bad` is logged and counted.
    """
    rows = open_rows(source, role, split, subset)
    fields = fields or {}
    if isinstance(rows, ArrowRows) and fields:
        missing = [f"{column!r} (data.fields.{name})" for name, column in fields.items()
                   if column not in rows.table.column_names]
        if missing:
            raise DataError(f"{role}: {rows.name} has no column {', '.join(missing)}; its columns are: "
                            f"{', '.join(rows.table.column_names)}")
    skipped = array.array("q")
    for i, read in enumerate(rows.scan()):
        try:
            record_of(read(), rows, i, check, fields)
        except (UnicodeDecodeError, json.JSONDecodeError, RecordError) as err:
            kind = "not valid UTF-8" if isinstance(err, UnicodeDecodeError) else \
                "not valid JSON" if isinstance(err, json.JSONDecodeError) else "bad record"
            message = f"{rows.where(i)}: {kind}: {err}"
            if not skip_bad:
                raise DataError(message + " (set data.skip_bad=true to skip bad records)") from err
            log.warning("skipping %s", message)
            skipped.append(i)
    if len(skipped) == len(rows):
        raise DataError(f"{role}: {rows.name} holds no usable records"
                        + (f" ({len(skipped)} skipped)" if skipped else ""))
    return Dataset(rows.name, Records(rows, np.frombuffer(skipped, dtype=np.int64), check, fields), len(skipped))


def load_jsonl(path: str | Path, check: Check, skip_bad: bool = False, role: str = "data") -> Dataset:
    """`load_records` of a JSONL file (kept for callers that read one)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{role}: file not found: {path}")
    return load_records(path, check, skip_bad, role)
