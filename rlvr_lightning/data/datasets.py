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

Rows that cannot be used (invalid JSON, a missing field, an empty question, an answer that does
not parse) are skipped, counted and reported in one warning, so one bad line never stops a run;
a source without a single usable row raises ValueError.

``JsonlDataModule`` is the ``PromptDataModule`` over such a source, with a validation split
either from ``val_path`` or held out of ``path`` deterministically by seed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from rlvr_lightning.data.datamodule import PromptDataModule
from rlvr_lightning.rewards import parse_gsm8k_answer

ANSWER_FORMATS = ("plain", "gsm8k", "number")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
REPO_ROOT = Path(__file__).resolve().parents[2]
# Environment variable that the data configs read the benchmark folder from.
DATA_DIR_ENV = "RLVR_DATA_DIR"
# Skipped rows quoted in the warning, at most.
MAX_EXAMPLES_IN_WARNING = 3

_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[-+]?\.\d+")


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
        f"(.jsonl, .json or .parquet), or set {DATA_DIR_ENV} to the folder holding the "
        "benchmark copies (gsm8k/, math500/, ...), which the data configs default to "
        "../shared/data beside the checkout"
    )


def is_file_path(path: str | Path) -> bool:
    """Whether ``path`` names a file (an existing one, or one by its suffix), not a hub name."""
    candidate = Path(path).expanduser()
    if candidate.suffix.lower() in FILE_SUFFIXES or candidate.is_file():
        return True
    return not candidate.is_absolute() and (REPO_ROOT / candidate).is_file()


def _iter_json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                yield number, MalformedRow(f"invalid JSON ({error.msg})", kind="invalid JSON")


def _iter_json(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as text:
        head = text.read(4096).lstrip()
    if not head.startswith("["):  # a .json file written one object a line
        yield from _iter_json_lines(path)
        return
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
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


def _iter_hub(name: str, split: str, subset: str | None) -> Iterator[tuple[int, Any]]:
    if importlib.util.find_spec("datasets") is None:
        raise ImportError(
            f"{name!r} is not a file, so it is read as a Hugging Face hub data set, which needs "
            "the `datasets` package: `pip install datasets` (and network access), or pass "
            "data.path=/path/to/file.jsonl"
        )
    import datasets

    yield from enumerate(datasets.load_dataset(name, subset, split=split), start=1)


def iter_records(
    path: str | Path, split: str = "train", subset: str | None = None
) -> Iterator[tuple[int, Any]]:
    """``(position, record)`` pairs of a source; positions count from 1 (file line numbers for
    JSON Lines). A record that is not valid JSON comes as a MalformedRow instance."""
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
            repository root) or a hub data set name.
        question_field, answer_field: the source fields holding the question and the answer.
        answer_format: ``"plain"``, ``"gsm8k"`` or ``"number"`` (see ``format_answer``).
        limit: keep only the first ``limit`` usable rows of ``path`` (None: all).
        val_size: validation rows. Without ``val_path`` they are held out of ``path``: a
            permutation seeded by ``seed`` picks them and the rest train (0: no validation, for
            evaluation-only sets). With ``val_path``: the first ``val_size`` usable rows of it
            (None: all).
        val_path: a separate validation source, read with the same field mapping.
        split, val_split: the splits of ``path`` and ``val_path`` when they are hub names.
        subset: the hub data set's configuration name (e.g. ``"main"`` for ``openai/gsm8k``).
        **kwargs: ``PromptDataModule`` arguments (prompts_per_step, val_batch_size, seed,
            generation_batches_per_step).

    Rows keep the source order (``index`` is the position in the source), so with
    ``val_size=0`` the training rows are exactly the first ``limit`` usable rows.
    """

    def __init__(
        self,
        path: str,
        question_field: str = "question",
        answer_field: str = "answer",
        answer_format: str = "plain",
        limit: int | None = None,
        val_size: int | None = 0,
        val_path: str | None = None,
        split: str = "train",
        val_split: str = "test",
        subset: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(
                f"data.answer_format={answer_format!r} is unknown; use one of {ANSWER_FORMATS}"
            )
        if val_size is not None and val_size < 0:
            raise ValueError(f"data.val_size={val_size} must be >= 0")
        if val_size is None and val_path is None:
            raise ValueError("data.val_size=null (all rows) needs data.val_path")
        self.path = str(path)
        self.mapping = dict(
            question_field=question_field, answer_field=answer_field, answer_format=answer_format
        )
        self.limit = limit
        self.val_size = val_size
        self.val_path = val_path
        self.split = split
        self.val_split = val_split
        self.subset = subset

    def load_rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        rows = load_rows(self.path, **self.mapping, limit=self.limit, split=self.split,
                         subset=self.subset)
        if self.val_path is not None:
            if self.val_size == 0:
                return rows, []
            val_rows = load_rows(self.val_path, **self.mapping, limit=self.val_size,
                                 split=self.val_split, subset=self.subset)
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
