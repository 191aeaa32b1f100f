"""metrics.jsonl on resume: records after the restored step and a partial last line (a kill mid-write) are dropped;
a corrupt line elsewhere is an error naming the file and line."""

import json

import pytest

from rrt import metrics_log


def test_logger_drops_records_after_the_restored_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 10.0 - s}) + "\n" for s in range(1, 6)))
    logger = metrics_log.Logger(str(tmp_path), resume_step=3)
    logger.write(4, {"loss": 1.5})
    logger.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 1.5)]


def test_partial_last_line_is_dropped_and_the_run_appends(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 4))
    path.write_text(good + '{"step": 4, "lo')  # SIGKILL in the middle of a write
    logger = metrics_log.Logger(str(tmp_path), resume_step=3)
    logger.write(4, {"loss": 0.5})
    logger.close()
    assert [r["step"] for r in metrics_log.read_records(str(path))] == [1, 2, 3, 4]


def test_corrupt_line_in_the_middle_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, oops\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        metrics_log.read_records(str(path))
