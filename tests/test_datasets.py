"""File data sets: the benchmark copies through their data configs, answer formats, bad rows."""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import pytest
from hydra.utils import instantiate

from rlvr_lightning.data import JsonlDataModule
from rlvr_lightning.data.datasets import canonical_number, load_rows, split_rows
from rlvr_lightning.rewards import RewardFunction, numeric_equal
from tests.conftest import compose_config

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """The benchmark copies: ``$RLVR_DATA_DIR``, else ``../shared/data`` beside the checkout."""
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "data"]
    if os.environ.get("RLVR_DATA_DIR"):
        candidates.insert(0, Path(os.environ["RLVR_DATA_DIR"]))
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    pytest.skip("benchmark data not found: set RLVR_DATA_DIR or put it in ../shared/data")


def benchmark(name: str) -> Path:
    path = data_dir() / name / "test.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def data_module(data: str, *overrides: str) -> JsonlDataModule:
    cfg = compose_config([f"data={data}", *overrides])
    return instantiate(cfg.data)


def write_jsonl(path: Path, rows: list[object]) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) + "\n" for row in rows]
    path.write_text("".join(lines))
    return path


# --- the benchmark copies through their configs --------------------------------------------


def test_every_gsm8k_answer_parses_through_the_data_config() -> None:
    folder = data_dir()
    if not (folder / "gsm8k" / "train.jsonl").is_file():
        pytest.skip("gsm8k/train.jsonl not found")
    datamodule = data_module(
        "gsm8k", f"data.path={folder}/gsm8k/train.jsonl",
        f"data.val_path={folder}/gsm8k/test.jsonl", "data.val_size=null",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a skipped row would warn
        datamodule.setup("fit")
    assert (len(datamodule.train_rows), len(datamodule.val_rows)) == (7473, 1319)
    for row in datamodule.train_rows + datamodule.val_rows:
        assert numeric_equal(row["answer"], row["answer"]), row
        assert "," not in row["answer"] and "#" not in row["answer"]


def test_default_paths_resolve_from_another_working_directory(monkeypatch, tmp_path) -> None:
    """``../shared/data`` in the configs is found relative to the repository root."""
    if not (REPO.parent / "shared" / "data" / "gsm8k" / "test.jsonl").is_file():
        pytest.skip("../shared/data beside the checkout not found")
    monkeypatch.delenv("RLVR_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    datamodule = data_module("gsm8k", "data.limit=5", "data.val_size=3")
    train, val = datamodule.load_rows()
    assert len(train) == 5 and len(val) == 3


def test_math500_reference_solutions_verify_against_their_answers() -> None:
    rows = data_module("math500", f"data.path={benchmark('math500')}").load_rows()[0]
    lines = benchmark("math500").read_text().splitlines()
    solutions = [json.loads(line)["solution"] for line in lines if line.strip()]
    assert len(rows) == 500
    completions = [solutions[row["index"]] for row in rows]
    answers = [row["answer"] for row in rows]
    start = time.perf_counter()
    with RewardFunction(method="math_verify", timeout_seconds=10.0) as reward:
        matched = reward(completions, answers)
        # Control: a solution against another problem's answer must not verify.
        shuffled = reward(completions, answers[1:] + answers[:1])
    seconds = time.perf_counter() - start
    accuracy = sum(matched.correct) / len(rows)
    print(f"MATH500: {accuracy:.3f} of reference solutions verify ({seconds:.1f} s, 1000 checks)")
    assert accuracy >= 0.98
    assert sum(shuffled.correct) / len(rows) < 0.1
    assert matched.num_failures + matched.num_timeouts <= 10


def test_amc23_float_answers_load_as_integers() -> None:
    rows = data_module("amc23", f"data.path={benchmark('amc23')}").load_rows()[0]
    assert len(rows) == 40
    assert rows[0]["answer"] == "27"
    assert all("." not in row["answer"] for row in rows)
    assert "-1" in {row["answer"] for row in rows}


@pytest.mark.parametrize("name", ["aime24", "aime25"])
def test_aime_answers_are_canonical_integers(name: str) -> None:
    rows = data_module(name, f"data.path={benchmark(name)}").load_rows()[0]
    assert len(rows) == 30
    for row in rows:
        assert row["question"] and 0 <= int(row["answer"]) <= 999
        assert row["answer"] == str(int(row["answer"]))  # "025" -> "25"


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


def test_parquet_and_hub_sources_name_the_missing_package(tmp_path) -> None:
    import importlib.util

    if importlib.util.find_spec("pyarrow") is None:
        parquet = tmp_path / "d.parquet"
        parquet.write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pip install pyarrow"):
            load_rows(parquet)
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(ImportError, match="pip install datasets"):
            load_rows("openai/gsm8k")


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
