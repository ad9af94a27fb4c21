"""Question/answer data sets from files or the Hugging Face hub (``data=gsm8k``, ``data=jsonl``).

``load_rows`` reads one source into rows ``{"question", "answer", "index"}``: a JSON Lines file
(``.jsonl``), a JSON file (``.json``: an array of objects, or JSON Lines), a Parquet file
(``.parquet``, needs ``pyarrow``), or a hub data set name (needs ``datasets``; only read when the
path is not a file). The config maps the source's fields onto ``question`` and ``answer`` and
names how the answer is written:

* ``plain``: the field as it is (a string, or a number written with ``str``);
* ``gsm8k``: the number after ``#### `` (GSM8K's worked solutions), thousands separators dropped;
* ``number``: a number in canonical form: ``12.0`` -> ``"12"``, ``"025"`` -> ``"25"``,
  ``"2.50"`` -> ``"2.5"`` (AMC23's float answers, AIME's zero-padded ones).

Rows that cannot be used (invalid JSON, a line that is not UTF-8, a missing field, an empty
question, an answer that does not parse) are skipped, counted and reported in one warning, so one
bad line never stops a run; a source without a single usable row raises ValueError.

The benchmark configs (``data=gsm8k``, ``math500``, ``aime24``, ``aime25``, ``amc23``) leave
``data.path`` unset and name a ``benchmark``, a ``split`` and a ``hub`` data set;
``resolve_source`` picks the source of a split, first match wins:

1. ``data.path`` (``data.val_path`` for validation) when given: a file or a hub name;
2. ``$RLVR_DATA_DIR/<benchmark>/<split>.jsonl`` when ``RLVR_DATA_DIR`` is set (the file must
   exist there);
3. the copy shipped inside the package, ``rlvr_lightning/data/benchmarks/<benchmark>/<split>.jsonl``
   (MATH500, AIME24, AIME25 and AMC23 test sets), so evaluation runs offline out of the box;
4. the hub data set ``hub`` (split ``hub_splits.get(split, split)``), read through ``datasets``.

``JsonlDataModule`` is the ``PromptDataModule`` over such a source, with a validation split
either from its own source (``val_path``, or the benchmark's ``val_split``) or held out of the
training rows deterministically by seed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import re
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from rlvr_lightning.data.datamodule import PromptDataModule
from rlvr_lightning.rewards import parse_gsm8k_answer

ANSWER_FORMATS = ("plain", "gsm8k", "number")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
REPO_ROOT = Path(__file__).resolve().parents[2]
# Environment variable naming a folder of benchmark files: <folder>/<benchmark>/<split>.jsonl.
DATA_DIR_ENV = "RLVR_DATA_DIR"
# The evaluation sets shipped inside the package, in the same layout (see its README.md).
BENCHMARKS_DIR = Path(__file__).resolve().parent / "benchmarks"
# How to read a local copy instead of the hub; the end of the hub errors' messages.
LOCAL_COPY_HINT = (
    "pass a local copy with data.path=/path/to/file.jsonl (data.val_path=... for the validation "
    f"source), or set {DATA_DIR_ENV} to a folder holding the benchmark files laid out as "
    "<folder>/gsm8k/train.jsonl, <folder>/gsm8k/test.jsonl, <folder>/math500/test.jsonl, ..."
)
# Skipped rows quoted in the warning, at most.
MAX_EXAMPLES_IN_WARNING = 3

_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[-+]?\.\d+")


class HubDatasetError(RuntimeError):
    """A hub data set that could not be loaded (no network, an unknown name, split or subset);
    the message names the data set and how to read a local copy instead."""


class MalformedRow(ValueError):
    """A source row that cannot become a ``{"question", "answer"}`` pair; the message says why
    and ``kind`` names the reason without the row's values (for counting)."""

    def __init__(self, message: str, kind: str = "unparsable answer") -> None:
        super().__init__(message)
        self.kind = kind


# ---------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def canonical_number(value: Any) -> str:
    """A number's canonical string: integral values without a decimal part, no padding zeros.

    ``12.0`` -> ``"12"``, ``"025"`` -> ``"25"``, ``"1,234"`` -> ``"1234"``, ``"2.50"`` ->
    ``"2.5"``, ``-0.0`` -> ``"0"``. Raises MalformedRow for anything else (text, NaN, bools).
    """
    if isinstance(value, bool):
        raise MalformedRow(f"answer {_short(value)} is a bool, not a number")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise MalformedRow(f"answer {_short(value)} is not a finite number")
        # repr is the shortest decimal that round-trips: 0.1 -> "0.1", not 0.1000000000000000055.
        number = Decimal(repr(value))
    elif isinstance(value, str) and _PLAIN_NUMBER.fullmatch(value.strip()):
        try:
            number = Decimal(value.strip().replace(",", ""))
        except InvalidOperation as error:  # pragma: no cover - the pattern admits only numbers
            raise MalformedRow(f"answer {_short(value)} is not a number") from error
    else:
        raise MalformedRow(f"answer {_short(value)} is not a number")
    if number == number.to_integral_value():
        return str(int(number))
    return format(number.normalize(), "f")


def format_answer(value: Any, answer_format: str) -> str:
    """The reference answer string of a raw field value, by ``answer_format`` (see module doc)."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(
            f"unknown answer_format {answer_format!r}; expected one of {ANSWER_FORMATS}"
        )
    if value is None:
        raise MalformedRow("answer is null", kind="empty answer")
    if answer_format == "number":
        return canonical_number(value)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise MalformedRow(f"answer is a {type(value).__name__}, not a string or a number")
    if answer_format == "gsm8k":
        try:
            return parse_gsm8k_answer(str(value))
        except ValueError as error:
            raise MalformedRow(str(error)) from error
    answer = str(value).strip()
    if not answer:
        raise MalformedRow("answer is empty", kind="empty answer")
    return answer


def make_row(
    record: Any, question_field: str, answer_field: str, answer_format: str
) -> dict[str, str]:
    """``{"question", "answer"}`` from one source record; MalformedRow when it cannot."""
    if not isinstance(record, dict):
        raise MalformedRow(
            f"row is a {type(record).__name__}, not an object", kind="not an object"
        )
    for field in (question_field, answer_field):
        if field not in record:
            raise MalformedRow(f"missing field {field!r}", kind=f"missing field {field!r}")
    question = record[question_field]
    if not isinstance(question, str) or not question.strip():
        raise MalformedRow(
            f"field {question_field!r} is empty or not a string", kind="empty question"
        )
    answer = format_answer(record[answer_field], answer_format)
    return {"question": question.strip(), "answer": answer}


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


def resolve_path(path: str | Path) -> Path:
    """An existing file: ``path`` as given (absolute or from the working directory), else
    relative to the repository root. Raises FileNotFoundError naming both places and the fix."""
    candidate = Path(path).expanduser()
    if candidate.is_file():
        return candidate
    from_root = REPO_ROOT / candidate
    if not candidate.is_absolute() and from_root.is_file():
        return from_root
    tried = str(candidate.resolve()) + ("" if candidate.is_absolute() else f" and {from_root}")
    raise FileNotFoundError(
        f"data file {str(path)!r} not found (looked at {tried}); pass data.path=/path/to/file "
        f"(.jsonl, .json or .parquet), or, for a benchmark config (data=gsm8k, data=math500, ...), "
        f"leave data.path unset and set {DATA_DIR_ENV} to a folder laid out as "
        "<folder>/gsm8k/train.jsonl, <folder>/math500/test.jsonl, ..."
    )


def is_file_path(path: str | Path) -> bool:
    """Whether ``path`` names a file (an existing one, or one by its suffix), not a hub name."""
    candidate = Path(path).expanduser()
    if candidate.suffix.lower() in FILE_SUFFIXES or candidate.is_file():
        return True
    return not candidate.is_absolute() and (REPO_ROOT / candidate).is_file()


def _iter_json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """Decoded per line, so a line that is not UTF-8 (a Latin-1 file, a stray byte) is one
    malformed row, not a UnicodeDecodeError that stops the run; a UTF-8 byte order mark on the
    first line is dropped."""
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                yield number, MalformedRow(
                    f"not UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1} of line "
                    f"{number}; a Latin-1 file? save it as UTF-8)",
                    kind="not UTF-8",
                )
                continue
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                yield number, MalformedRow(f"invalid JSON ({error.msg})", kind="invalid JSON")


def _read_utf8(path: Path) -> str:
    """The whole file as text; ValueError naming the file and the first bad byte when it is not
    UTF-8 (a JSON array cannot skip the bad row alone)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(
            f"{path} is not UTF-8: byte 0x{data[error.start]:02x} on line {line} (a Latin-1 "
            "file? save it as UTF-8)"
        ) from error


def _iter_json(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as head_bytes:
        head = head_bytes.read(4096).decode("utf-8-sig", errors="replace").lstrip()
    if not head.startswith("["):  # a .json file written one object a line
        yield from _iter_json_lines(path)
        return
    try:
        records = json.loads(_read_utf8(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(records, list):
        raise ValueError(f"{path} holds a JSON {type(records).__name__}, not an array of rows")
    yield from enumerate(records, start=1)


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    if importlib.util.find_spec("pyarrow") is None:
        raise ImportError(
            f"reading the Parquet file {path} needs pyarrow, which is not installed: "
            "`pip install pyarrow`"
        )
    import pyarrow.parquet as parquet

    yield from enumerate(parquet.read_table(path).to_pylist(), start=1)


def _load_hub_dataset(name: str, subset: str | None, split: str) -> Any:
    """``datasets.load_dataset(name, subset, split=split)``, importing ``datasets`` only here (it
    is optional: the ``bench`` extra)."""
    if importlib.util.find_spec("datasets") is None:
        raise ImportError(
            f"{name!r} (split {split!r}) is not a file, so it is read as a Hugging Face hub data "
            "set, which needs the `datasets` package (`pip install datasets`) and network "
            f"access; to go without them, {LOCAL_COPY_HINT}"
        )
    import datasets

    return datasets.load_dataset(name, subset, split=split)


def _iter_hub(name: str, split: str | None, subset: str | None) -> Iterator[tuple[int, Any]]:
    if not split:
        raise ValueError(
            f"the hub data set {name!r} is read one split at a time: set data.split (or "
            "data.val_split for data.val_path)"
        )
    try:
        records = _load_hub_dataset(name, subset, split)
    except ImportError:
        raise
    except Exception as error:  # offline (ConnectionError, httpx errors ...), unknown name/split
        raise HubDatasetError(
            f"could not load the Hugging Face hub data set {name!r} (subset {subset!r}, split "
            f"{split!r}): {type(error).__name__}: {error}. Without network access (or when the "
            f"hub lacks it), {LOCAL_COPY_HINT}"
        ) from error
    yield from enumerate(records, start=1)


def resolve_source(
    path: str | Path | None,
    split: str,
    benchmark: str | None = None,
    hub: str | None = None,
    hub_splits: Mapping[str, str] | None = None,
) -> tuple[str, str]:
    """``(source, split)`` to read for one split: ``path`` when given, else
    ``$RLVR_DATA_DIR/<benchmark>/<split>.jsonl``, else the shipped copy
    ``BENCHMARKS_DIR/<benchmark>/<split>.jsonl``, else the hub data set ``hub`` at split
    ``hub_splits.get(split, split)`` (see the module doc).

    Raises FileNotFoundError when ``RLVR_DATA_DIR`` is set but lacks the file, and ValueError
    when there is no source at all.
    """
    if path is not None and str(path).strip():
        return str(path), split
    if benchmark:
        relative = Path(benchmark) / f"{split}.jsonl"
        data_dir = os.environ.get(DATA_DIR_ENV, "").strip()
        if data_dir:
            candidate = Path(data_dir).expanduser() / relative
            if candidate.is_file():
                return str(candidate), split
            if (BENCHMARKS_DIR / relative).is_file():
                fallback = " to read the copy shipped with the package"
            else:
                fallback = f" to read the hub data set {hub!r}" if hub else ""
            raise FileNotFoundError(
                f"{DATA_DIR_ENV}={data_dir} has no {relative.as_posix()} (looked at "
                f"{candidate.resolve()}); put the file there (the layout is "
                "<folder>/<benchmark>/<split>.jsonl, e.g. gsm8k/train.jsonl), pass "
                f"data.path=/path/to/file.jsonl, or unset {DATA_DIR_ENV}{fallback}"
            )
        if (BENCHMARKS_DIR / relative).is_file():
            return str(BENCHMARKS_DIR / relative), split
    if hub:
        return hub, dict(hub_splits or {}).get(split, split)
    raise ValueError(
        "no data source: set data.path to a .jsonl / .json / .parquet file or a hub data set name"
    )


def iter_records(
    path: str | Path, split: str = "train", subset: str | None = None
) -> Iterator[tuple[int, Any]]:
    """``(position, record)`` pairs of a source; positions count from 1 (file line numbers for
    JSON Lines). A JSON Lines record that is not valid JSON or not UTF-8 comes as a MalformedRow
    instance."""
    if not is_file_path(path):
        yield from _iter_hub(str(path), split, subset)
        return
    resolved = resolve_path(path)
    suffix = resolved.suffix.lower()
    if suffix == ".parquet":
        yield from _iter_parquet(resolved)
    elif suffix == ".json":
        yield from _iter_json(resolved)
    else:
        yield from _iter_json_lines(resolved)


def load_rows(
    path: str | Path,
    question_field: str = "question",
    answer_field: str = "answer",
    answer_format: str = "plain",
    limit: int | None = None,
    split: str = "train",
    subset: str | None = None,
) -> list[dict[str, Any]]:
    """The usable rows of a source, in source order: ``{"question", "answer", "index"}``.

    ``index`` is the record's 0-based position in the source (the line number minus one for
    JSON Lines), so a row can be looked up.
    ``limit`` keeps the first ``limit`` usable rows (None: all). Skipped rows are reported in
    one warning. Raises ValueError when no row is usable, FileNotFoundError for a missing file
    and ImportError when reading the source needs a package that is not installed.
    """
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(
            f"unknown answer_format {answer_format!r}; expected one of {ANSWER_FORMATS}"
        )
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of rows or null, got {limit}")
    rows: list[dict[str, Any]] = []
    reasons: Counter[str] = Counter()
    examples: list[str] = []
    for position, record in iter_records(path, split, subset):
        if limit is not None and len(rows) == limit:
            break
        try:
            if isinstance(record, MalformedRow):
                raise record
            row = make_row(record, question_field, answer_field, answer_format)
        except MalformedRow as error:
            reasons[error.kind] += 1
            if len(examples) < MAX_EXAMPLES_IN_WARNING:
                examples.append(f"row {position}: {error}")
            continue
        rows.append({**row, "index": position - 1})
    mapping = (
        f"question_field={question_field!r}, answer_field={answer_field!r}, "
        f"answer_format={answer_format!r}"
    )
    skipped = sum(reasons.values())
    if not rows:
        raise ValueError(
            f"{path} has no usable row with {mapping} ({skipped} skipped; e.g. "
            f"{'; '.join(examples) or 'the source is empty'}); check the field names against "
            "the file"
        )
    if skipped:
        counts = ", ".join(f"{count} {kind}" for kind, count in reasons.most_common())
        warnings.warn(
            f"{path}: skipped {skipped} malformed row(s) of {skipped + len(rows)} read with "
            f"{mapping} ({counts}); e.g. {'; '.join(examples)}",
            stacklevel=2,
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Data module
# ---------------------------------------------------------------------------------------------


class JsonlDataModule(PromptDataModule):
    """Question/answer rows from a file or a hub data set (``data=gsm8k``, ``data=jsonl`` ...).

    Args:
        path: a ``.jsonl`` / ``.json`` / ``.parquet`` file (as given, else relative to the
            repository root) or a hub data set name; None: the benchmark's default source
            (``resolve_source``: ``$RLVR_DATA_DIR``, the shipped copy, the hub).
        question_field, answer_field: the source fields holding the question and the answer.
        answer_format: ``"plain"``, ``"gsm8k"`` or ``"number"`` (see ``format_answer``).
        limit: keep only the first ``limit`` usable rows of the training source (None: all).
        val_size: validation rows. Without a validation source they are held out of the
            training rows: a permutation seeded by ``seed`` picks them and the rest train (0: no
            validation, for evaluation-only sets). With one: its first ``val_size`` usable rows
            (None: all).
        val_path: a separate validation source (file or hub name), read with the same field
            mapping; None: the benchmark's ``val_split`` when there is one, else none.
        split: the training split: the hub split of a hub name, and the file
            ``<benchmark>/<split>.jsonl`` of the default source.
        val_split: the same for validation; None: no default validation source.
        subset: the hub data set's configuration name (e.g. ``"main"`` for ``openai/gsm8k``).
        benchmark: the folder of the default source's files, under ``$RLVR_DATA_DIR`` and in
            the package's shipped copies (``"gsm8k"``, ``"math500"`` ...); None: no such files.
        hub: the default source's hub data set name (None: none).
        hub_splits: hub split names that differ from ``split`` / ``val_split`` (e.g.
            ``{"test": "train"}``: HuggingFaceH4/aime_2024 has only a train split).
        **kwargs: ``PromptDataModule`` arguments (prompts_per_step, val_batch_size, seed,
            generation_batches_per_step).

    Rows keep the source order (``index`` is the position in the source), so with
    ``val_size=0`` the training rows are exactly the first ``limit`` usable rows.
    ``load_rows`` records the ``(source, split)`` it read in ``train_source`` and
    ``val_source`` (None: held out, or not read).
    """

    def __init__(
        self,
        path: str | None = None,
        question_field: str = "question",
        answer_field: str = "answer",
        answer_format: str = "plain",
        limit: int | None = None,
        val_size: int | None = 0,
        val_path: str | None = None,
        split: str = "train",
        val_split: str | None = "test",
        subset: str | None = None,
        benchmark: str | None = None,
        hub: str | None = None,
        hub_splits: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(
                f"data.answer_format={answer_format!r} is unknown; use one of {ANSWER_FORMATS}"
            )
        if val_size is not None and val_size < 0:
            raise ValueError(f"data.val_size={val_size} must be >= 0")
        if path is None and not (benchmark or hub):
            raise ValueError(
                "data.path is required: a .jsonl / .json / .parquet file or a hub data set name"
            )
        self.path = None if path is None else str(path)
        self.mapping = dict(
            question_field=question_field, answer_field=answer_field, answer_format=answer_format
        )
        self.limit = limit
        self.val_size = val_size
        self.val_path = None if val_path is None else str(val_path)
        self.split = split
        self.val_split = val_split
        self.subset = subset
        self.benchmark = benchmark
        self.hub = hub
        self.hub_splits = dict(hub_splits or {})
        if val_size is None and not self.has_val_source():
            raise ValueError(
                "data.val_size=null (all rows) needs a validation source: data.val_path, or "
                "data.val_split with a benchmark config"
            )
        self.train_source: tuple[str, str] | None = None
        self.val_source: tuple[str, str] | None = None

    def has_val_source(self) -> bool:
        """Whether validation reads its own source (else ``val_size`` rows are held out)."""
        return self.val_path is not None or (
            self.val_split is not None and bool(self.benchmark or self.hub)
        )

    def resolve(self, path: str | None, split: str) -> tuple[str, str]:
        return resolve_source(path, split, self.benchmark, self.hub, self.hub_splits)

    def load_rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        self.train_source = self.resolve(self.path, self.split)
        source, split = self.train_source
        rows = load_rows(source, **self.mapping, limit=self.limit, split=split,
                         subset=self.subset)
        if self.has_val_source():
            if self.val_size == 0:
                return rows, []
            self.val_source = self.resolve(self.val_path, self.val_split)
            source, split = self.val_source
            val_rows = load_rows(source, **self.mapping, limit=self.val_size, split=split,
                                 subset=self.subset)
            return rows, val_rows
        return split_rows(rows, int(self.val_size or 0), self.seed)


def split_rows(
    rows: list[dict[str, Any]], val_size: int, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Hold ``val_size`` rows out, chosen by a permutation seeded with ``seed``; both parts
    keep the source order. At least one row must remain for training."""
    if val_size == 0:
        return list(rows), []
    if val_size >= len(rows):
        raise ValueError(
            f"data.val_size={val_size} leaves no training row: the source has {len(rows)} "
            "usable rows; lower val_size, or set val_path"
        )
    held_out = set(random.Random(seed).sample(range(len(rows)), val_size))
    train = [row for i, row in enumerate(rows) if i not in held_out]
    val = [row for i, row in enumerate(rows) if i in held_out]
    return train, val
