"""Data sets: the benchmark configs' sources (data.path, RLVR_DATA_DIR, the shipped copies, the
hub), answer formats, bad rows and splits. Benchmark rows come from the fixtures in
tests/fixtures/data (a few rows of each set, in the RLVR_DATA_DIR layout) and the copies shipped in
rlvr_lightning/data/benchmarks."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import time
import types
import warnings
from fnmatch import fnmatch
from pathlib import Path

import pytest
from hydra.utils import instantiate

from rlvr_lightning.data import JsonlDataModule
from rlvr_lightning.data import datasets as data_sets
from rlvr_lightning.data.datasets import (
    BENCHMARKS_DIR,
    HubDatasetError,
    canonical_number,
    load_rows,
    resolve_source,
    split_rows,
)
from rlvr_lightning.rewards import RewardFunction, numeric_equal
from tests.conftest import compose_config

REPO = Path(__file__).resolve().parents[1]
# A few rows of each benchmark, laid out like an RLVR_DATA_DIR folder: <benchmark>/<split>.jsonl.
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"
# The shipped evaluation sets and their sizes.
SHIPPED = {"math500": 500, "aime24": 30, "aime25": 30, "amc23": 40}


@pytest.fixture(autouse=True)
def no_data_dir(monkeypatch):
    """Every test starts without RLVR_DATA_DIR (a developer's shell may set it)."""
    monkeypatch.delenv("RLVR_DATA_DIR", raising=False)


def fixture_lines(name: str, split: str = "test") -> list[dict]:
    text = (FIXTURES / name / f"{split}.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def data_module(data: str, *overrides: str) -> JsonlDataModule:
    cfg = compose_config([f"data={data}", *overrides])
    return instantiate(cfg.data)


def write_jsonl(path: Path, rows: list[object]) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) + "\n" for row in rows]
    path.write_text("".join(lines))
    return path


def fake_datasets(monkeypatch, load_dataset) -> None:
    """An importable stand-in for the optional ``datasets`` package (no network, no install)."""
    module = types.ModuleType("datasets")
    module.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)


# --- the shipped evaluation sets ------------------------------------------------------------


@pytest.mark.parametrize(("name", "rows"), sorted(SHIPPED.items()))
def test_shipped_sets_are_the_default_and_load_every_row(name: str, rows: int) -> None:
    datamodule = data_module(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a skipped row would warn
        train, val = datamodule.load_rows()
    assert (len(train), val) == (rows, [])
    assert datamodule.train_source == (str(BENCHMARKS_DIR / name / "test.jsonl"), "test")


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_rows_are_the_full_copies_rows(name: str) -> None:
    """The fixtures are rows of the full copies (solutions and all); the shipped copy, its long
    fields dropped, gives the same question and answer for each of them."""
    key = {"math500": "unique_id", "amc23": "question"}.get(name, "problem")
    records = [json.loads(line) for line in
               (BENCHMARKS_DIR / name / "test.jsonl").read_text().splitlines()]
    shipped = dict(zip([record[key] for record in records], data_module(name).load_rows()[0],
                       strict=True))
    full = data_module(name, f"data.path={FIXTURES / name / 'test.jsonl'}").load_rows()[0]
    for record, row in zip(fixture_lines(name), full, strict=True):
        assert shipped[record[key]]["question"] == row["question"]
        assert shipped[record[key]]["answer"] == row["answer"]


def test_shipped_sets_are_package_data() -> None:
    """pyproject's package-data globs cover every shipped file (an installed wheel has them)."""
    tomllib = pytest.importorskip("tomllib")
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["rlvr_lightning.data"]
    package = REPO / "rlvr_lightning" / "data"
    files = [path.relative_to(package).as_posix() for path in BENCHMARKS_DIR.rglob("*")
             if path.is_file()]
    assert sorted(files) == sorted(["benchmarks/README.md"] + [
        f"benchmarks/{name}/test.jsonl" for name in SHIPPED])
    for file in files:
        assert any(fnmatch(file, pattern) for pattern in patterns), file
    assert sum((BENCHMARKS_DIR / name / "test.jsonl").stat().st_size for name in SHIPPED) < 1e6


def test_shipped_sets_load_from_another_working_directory(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    assert len(data_module("aime25", "data.limit=5").load_rows()[0]) == 5


def test_amc23_float_answers_load_as_integers() -> None:
    rows = data_module("amc23").load_rows()[0]
    assert rows[0]["answer"] == "27"
    assert all("." not in row["answer"] for row in rows)
    assert "-1" in {row["answer"] for row in rows}


@pytest.mark.parametrize("name", ["aime24", "aime25"])
def test_aime_answers_are_canonical_integers(name: str) -> None:
    rows = data_module(name).load_rows()[0]
    for row in rows:
        assert row["question"] and 0 <= int(row["answer"]) <= 999
        assert row["answer"] == str(int(row["answer"]))  # "025" -> "25"
    if name == "aime24":
        assert "25" in {row["answer"] for row in rows}  # written "025" in the file


# --- RLVR_DATA_DIR, data.path and the hub ----------------------------------------------------


def test_gsm8k_reads_train_and_test_from_rlvr_data_dir(monkeypatch) -> None:
    monkeypatch.setenv("RLVR_DATA_DIR", str(FIXTURES))
    datamodule = data_module("gsm8k", "data.val_size=null")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a skipped row would warn
        datamodule.setup("fit")
    assert datamodule.train_source == (str(FIXTURES / "gsm8k" / "train.jsonl"), "train")
    assert datamodule.val_source == (str(FIXTURES / "gsm8k" / "test.jsonl"), "test")
    train, val = datamodule.train_rows, datamodule.val_rows
    assert (len(train), len(val)) == (len(fixture_lines("gsm8k", "train")), 9)
    assert [row["question"] for row in val] == [r["question"] for r in fixture_lines("gsm8k")]
    answers = {row["answer"] for row in train + val}
    assert {"1080", "850000", "-7", "114200", "-10"} <= answers  # "1,080" and negatives
    for row in train + val:
        assert numeric_equal(row["answer"], row["answer"]), row
        assert "," not in row["answer"] and "#" not in row["answer"]
    # The test split for evaluation, the same way.
    test = data_module("gsm8k", "data.split=test").load_rows()[0]
    assert [row["question"] for row in test] == [row["question"] for row in val]


def test_rlvr_data_dir_overrides_the_shipped_copy(monkeypatch, tmp_path) -> None:
    (tmp_path / "math500").mkdir()
    write_jsonl(tmp_path / "math500" / "test.jsonl", [{"problem": "1 + 1?", "answer": "2"}])
    monkeypatch.setenv("RLVR_DATA_DIR", str(tmp_path))
    assert data_module("math500").load_rows()[0] == [
        {"question": "1 + 1?", "answer": "2", "index": 0}]


def test_rlvr_data_dir_without_the_file_says_where_it_looked(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("RLVR_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError) as caught:
        data_module("amc23").load_rows()
    message = str(caught.value)
    assert "amc23/test.jsonl" in message and str(tmp_path) in message
    assert "data.path=" in message and "unset RLVR_DATA_DIR to read the copy shipped" in message
    with pytest.raises(FileNotFoundError, match="hub data set 'openai/gsm8k'"):
        data_module("gsm8k").load_rows()


def test_data_path_overrides_rlvr_data_dir(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("RLVR_DATA_DIR", str(FIXTURES))
    train = write_jsonl(tmp_path / "mine.jsonl", [{"question": "q", "answer": "#### 3"}])
    val = write_jsonl(tmp_path / "mine_val.jsonl", [{"question": "v", "answer": "#### 4"}])
    datamodule = data_module("gsm8k", f"data.path={train}")
    rows, val_rows = datamodule.load_rows()
    assert rows == [{"question": "q", "answer": "3", "index": 0}]
    assert datamodule.val_source == (str(FIXTURES / "gsm8k" / "test.jsonl"), "test")
    assert len(val_rows) == 9
    datamodule = data_module("gsm8k", f"data.path={train}", f"data.val_path={val}")
    assert datamodule.load_rows()[1] == [{"question": "v", "answer": "4", "index": 0}]
    # An explicit file beats the shipped copy too.
    assert data_module("math500", f"data.path={FIXTURES / 'math500' / 'test.jsonl'}").load_rows(
    )[0][0]["question"].startswith("Convert the point $(0,3)$")


def test_gsm8k_without_a_local_copy_reads_the_hub(monkeypatch) -> None:
    calls = []

    def load_dataset(name, subset, split):
        calls.append((name, subset, split))
        return [{"question": f"{split} question", "answer": "#### 1"}]

    fake_datasets(monkeypatch, load_dataset)
    train, val = data_module("gsm8k").load_rows()
    assert calls == [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test")]
    assert train[0]["question"] == "train question" and val[0]["question"] == "test question"


def test_the_hub_split_of_aime24_is_train(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(data_sets, "BENCHMARKS_DIR", tmp_path)  # no shipped copy
    assert resolve_source(None, "test", "aime24", "HuggingFaceH4/aime_2024",
                          {"test": "train"}) == ("HuggingFaceH4/aime_2024", "train")
    datamodule = data_module("aime24")
    assert datamodule.resolve(None, "test") == ("HuggingFaceH4/aime_2024", "train")


def test_offline_hub_load_names_the_data_set_and_the_local_ways(monkeypatch) -> None:
    def offline(name, subset, split):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    fake_datasets(monkeypatch, offline)
    start = time.perf_counter()
    with pytest.raises(HubDatasetError) as caught:
        data_module("gsm8k").load_rows()
    assert time.perf_counter() - start < 5
    message = str(caught.value)
    for part in ("'openai/gsm8k'", "split 'train'", "ConnectionError", "data.path=",
                 "RLVR_DATA_DIR", "gsm8k/train.jsonl"):
        assert part in message, part
    assert isinstance(caught.value.__cause__, ConnectionError)


def test_missing_datasets_package_names_the_data_set_and_the_local_ways(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ImportError) as caught:
        data_module("gsm8k").load_rows()
    message = str(caught.value)
    for part in ("'openai/gsm8k'", "pip install datasets", "data.path=", "RLVR_DATA_DIR"):
        assert part in message, part


def test_a_hub_source_needs_a_split(monkeypatch) -> None:
    fake_datasets(monkeypatch, lambda name, subset, split: [])
    with pytest.raises(ValueError, match="data.split"):
        load_rows("org/name", split=None)


def test_math500_reference_solutions_verify_against_their_answers() -> None:
    """The fixture's MATH500 rows span the answer kinds (fractions, roots, text, a list, a
    tuple, an interval, a matrix, a polynomial); their worked solutions verify against their
    answers, and not against another row's."""
    rows = data_module("math500", f"data.path={FIXTURES / 'math500' / 'test.jsonl'}").load_rows()[0]
    solutions = [record["solution"] for record in fixture_lines("math500")]
    assert len(rows) == len(solutions) == 14
    completions = [solutions[row["index"]] for row in rows]
    answers = [row["answer"] for row in rows]
    with RewardFunction(method="math_verify", timeout_seconds=10.0) as reward:
        matched = reward(completions, answers)
        shuffled = reward(completions, answers[1:] + answers[:1])
    assert all(matched.correct), [a for a, c in zip(answers, matched.correct, strict=True) if not c]
    assert not any(shuffled.correct)


# --- formats and bad rows ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(12.0, "12"), (-1.0, "-1"), (0.5, "0.5"), (7, "7"), ("025", "25"), ("1,234", "1234"),
     ("2.50", "2.5"), (" 3 ", "3"), (-0.0, "0"), (1e20, "100000000000000000000")],
)
def test_canonical_number(value, expected) -> None:
    assert canonical_number(value) == expected


@pytest.mark.parametrize("value", ["twelve", "", "1/2", True, float("nan"), [1]])
def test_canonical_number_rejects_non_numbers(value) -> None:
    with pytest.raises(ValueError):
        canonical_number(value)


def test_malformed_rows_are_skipped_counted_and_reported_once(tmp_path) -> None:
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"q": "What is 1 + 1?", "a": "#### 2"},
        {"q": "No answer field"},
        {"a": "#### 3"},
        {"q": "   ", "a": "#### 4"},
        "{not json\n",
        "\n",
        {"q": "Unparsable", "a": "the answer is five"},
        {"q": "What is 2 + 3?", "a": "5 apples\n#### 5"},
        ["a", "list"],
    ])
    with pytest.warns(UserWarning) as caught:
        rows = load_rows(path, "q", "a", "gsm8k")
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "skipped 6 malformed row(s) of 8" in message
    for reason in ("missing field 'a'", "missing field 'q'", "empty question", "invalid JSON",
                   "unparsable answer", "not an object"):
        assert reason in message
    assert rows == [
        {"question": "What is 1 + 1?", "answer": "2", "index": 0},
        {"question": "What is 2 + 3?", "answer": "5", "index": 7},
    ]


def test_limit_keeps_the_first_usable_rows(tmp_path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl",
                       [{"question": f"q{i}", "answer": i} for i in range(10)])
    rows = load_rows(path, answer_format="number", limit=3)
    assert [row["answer"] for row in rows] == ["0", "1", "2"]


def test_json_array_files_load(tmp_path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"question": "q", "answer": 1.0}]))
    assert load_rows(path, answer_format="number")[0]["answer"] == "1"


def test_no_usable_row_raises_naming_the_file_and_the_mapping(tmp_path) -> None:
    path = write_jsonl(tmp_path / "wrong_fields.jsonl", [{"problem": "p", "solution": "s"}] * 3)
    with pytest.raises(ValueError, match="wrong_fields.jsonl.*question_field='question'"):
        load_rows(path)
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match="empty.jsonl"):
        load_rows(empty)


def test_missing_file_raises_with_the_fix(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="RLVR_DATA_DIR") as caught:
        data_module("jsonl", f"data.path={tmp_path}/missing.jsonl").setup()
    assert "missing.jsonl" in str(caught.value)
    assert "data.path=" in str(caught.value)


def test_parquet_source_names_the_missing_package(tmp_path) -> None:
    import importlib.util

    if importlib.util.find_spec("pyarrow") is not None:
        pytest.skip("pyarrow is installed")
    parquet = tmp_path / "d.parquet"
    parquet.write_bytes(b"PAR1")
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load_rows(parquet)


# --- text that is not UTF-8 -----------------------------------------------------------------


def test_lines_that_are_not_utf8_are_skipped_counted_and_named(tmp_path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(
        b'{"question": "What is 1 + 1?", "answer": "2"}\n'
        + '{"question": "Combien font 2 + 2 ? R\u00e9ponse", "answer": "4"}\n'.encode("latin-1")
        + b"{not json\n"
        + b'{"question": "What is 2 + 3?", "answer": "5"}\n'
    )
    with pytest.warns(UserWarning) as caught:
        rows = load_rows(path)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert str(path) in message and "skipped 2 malformed row(s) of 4" in message
    assert "1 not UTF-8" in message and "1 invalid JSON" in message
    assert "byte 0xe9" in message and "of line 2" in message
    assert [row["answer"] for row in rows] == ["2", "5"]
    assert [row["index"] for row in rows] == [0, 3]


def test_a_latin1_file_is_reported_not_a_unicode_error(tmp_path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes("".join(json.dumps({"question": f"Caf\u00e9 {i}?", "answer": str(i)},
                                        ensure_ascii=False) + "\n" for i in range(3))
                     .encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.jsonl has no usable row.*3 skipped.*not UTF-8"):
        load_rows(path)
    array = tmp_path / "latin1.json"
    array.write_bytes('[{"question": "Caf\u00e9?", "answer": "1"}]'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.json is not UTF-8: byte 0xe9 on line 1"):
        load_rows(array)


def test_a_utf8_byte_order_mark_is_read(tmp_path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"question": "q\xc3\xa9", "answer": "1"}\n')
    assert load_rows(path) == [{"question": "q\u00e9", "answer": "1", "index": 0}]
    array = tmp_path / "bom.json"
    array.write_bytes(b'\xef\xbb\xbf[{"question": "q", "answer": "1"}]')
    assert load_rows(array)[0]["question"] == "q"


# --- splits --------------------------------------------------------------------------------


def test_held_out_split_is_deterministic_disjoint_and_ordered(tmp_path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl",
                       [{"question": f"q{i}", "answer": str(i)} for i in range(20)])
    first = JsonlDataModule(str(path), val_size=5, seed=3).load_rows()
    again = JsonlDataModule(str(path), val_size=5, seed=3).load_rows()
    other = JsonlDataModule(str(path), val_size=5, seed=4).load_rows()
    train, val = first
    assert first == again and first != other
    assert len(train) == 15 and len(val) == 5
    assert {r["index"] for r in train}.isdisjoint({r["index"] for r in val})
    assert [r["index"] for r in train] == sorted(r["index"] for r in train)
    # val_size=0 keeps every row, in source order (what evaluation uses).
    assert JsonlDataModule(str(path), val_size=0).load_rows() == (load_rows(path), [])
    with pytest.raises(ValueError, match="no training row"):
        split_rows(train, len(train), seed=0)


def test_val_path_gives_its_first_val_size_rows(tmp_path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"question": "t", "answer": "1"}] * 4)
    val = write_jsonl(tmp_path / "val.jsonl",
                      [{"question": f"v{i}", "answer": str(i)} for i in range(6)])
    module = JsonlDataModule(str(train), val_path=str(val), val_size=2)
    rows, val_rows = module.load_rows()
    assert len(rows) == 4 and [r["question"] for r in val_rows] == ["v0", "v1"]
    module = JsonlDataModule(str(train), val_path=str(val), val_size=None)
    assert len(module.load_rows()[1]) == 6


@pytest.mark.parametrize("name", ["gsm8k", "math500", "aime24", "aime25", "amc23", "jsonl", "hf"])
def test_every_data_config_composes(name: str) -> None:
    cfg = compose_config([f"data={name}", "data.path=some/file.jsonl"])
    module = instantiate(cfg.data)
    assert isinstance(module, JsonlDataModule)
    assert module.prompts_per_step == cfg.rollout.prompts_per_step


def test_data_configs_name_no_folder_outside_the_project() -> None:
    for config in (REPO / "rlvr_lightning" / "conf" / "data").glob("*.yaml"):
        text = config.read_text()
        assert "../" not in text and "oc.env" not in text, config.name
