"""`vexport score` as a user runs it: exit codes, one-line errors, and runs killed with SIGKILL then resumed."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from tests.helpers import run_cli
from tests.scoring_helpers import (
    assert_every_row_once,
    kill_at_random_points,
    mixed_rows,
    write_jsonl,
)
from vexport.scoring import score

ROWS = mixed_rows(100, seed=5, max_words=20, bad_every=25)


def assert_bad_input(result, *needles: str) -> None:
    assert result.returncode == 2, result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("cli") / "rows.jsonl", ROWS)


@pytest.fixture(scope="module")
def finished(tiny_model_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "out"
    score(tiny_model_dir, data, out, part_rows=50)
    return out


def test_score_writes_parts_and_prints_a_summary_line(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS[:60])
    result = run_cli("score", tiny_model_dir, "--input", data, "--output", tmp_path / "out", "--part-rows", "25",
                     "--per-token")
    assert result.returncode == 0, result.stderr
    assert "scored 58 rows, rejected 2" in result.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "checksums.jsonl", "errors.jsonl", "part-000000000000-000000000025.parquet",
        "part-000000000025-000000000050.parquet", "part-000000000050-000000000060.parquet", "run.json", "summary.json"]
    assert "rows/s" in result.stderr and "tokens/s" in result.stderr  # the progress bar


def test_bad_input_is_one_line_and_exit_code_2(tiny_model_dir, data, finished, tmp_path):
    assert_bad_input(run_cli("score", tiny_model_dir, "--input", tmp_path / "nope.jsonl", "--output", tmp_path / "o"),
                     "--input", "does not exist")
    assert_bad_input(run_cli("score", tiny_model_dir, "--input", data, "--output", finished),
                     "is not empty", "--resume", "--force")
    first = next(i for i, r in enumerate(ROWS) if "text" not in r and "prompt" not in r and "messages" not in r)
    assert_bad_input(run_cli("score", tiny_model_dir, "--input", data, "--output", tmp_path / "strict", "--strict"),
                     "--strict", f"rows.jsonl:{first + 1} (row {first})", "missing fields")


def test_engine_ray_without_ray_names_the_install_line(tiny_model_dir, data, tmp_path):
    hide_ray = "import sys; sys.modules['ray'] = None; from vexport.cli import app; sys.argv[0] = 'vexport'; app()"
    result = subprocess.run([sys.executable, "-c", hide_ray, "score", str(tiny_model_dir), "--input", str(data),
                             "--output", str(tmp_path / "out"), "--engine", "ray"], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}, timeout=300)
    assert_bad_input(result, "--engine ray needs Ray Data", "pip install 'vexport[ray]'")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
class LateRandom(random.Random):
    """Random whose first kill moment is always the latest the window allows."""

    def uniform(self, a, b):
        return b


def test_a_run_that_beats_the_first_kill_is_started_again_until_one_lands(tiny_model_dir, tmp_path):
    """On a fast machine a small run ends before a kill 8 s in: the helper starts it again from nothing with a
    shorter window, so the test always gets its kill (it once ended with none and failed its count)."""
    rows = mixed_rows(30, seed=7, max_words=8, bad_every=10)
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    score(tiny_model_dir, data, tmp_path / "whole", part_rows=10)
    args = ["score", tiny_model_dir, "--input", data, "--output", tmp_path / "out", "--part-rows", "10", "--resume"]
    log = tmp_path / "log.txt"
    parts_at_kill = kill_at_random_points(args, tmp_path / "out", kills=1, rng=LateRandom(0), log=log)
    assert len(parts_at_kill) == 1, log.read_text()[-2000:]
    assert_every_row_once(tmp_path / "out", tmp_path / "whole", rows)


def test_sigkill_at_random_points_then_resume_gives_every_row_once(medium_model_dir, tmp_path):
    rows = mixed_rows(400, seed=6, max_words=20, bad_every=40)
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    score(medium_model_dir, data, tmp_path / "whole", part_rows=20)
    seed = random.SystemRandom().randrange(1 << 30)
    out = tmp_path / "out"
    args = ["score", medium_model_dir, "--input", data, "--output", out, "--part-rows", "20", "--threads", "1",
            "--resume"]
    parts_at_kill = kill_at_random_points(args, out, kills=3, rng=random.Random(seed), log=tmp_path / "log.txt")
    partway = [p for p in parts_at_kill if 0 < p < 20]
    assert len(parts_at_kill) == 3 and len(partway) >= 2, f"seed {seed}: parts at each kill {parts_at_kill}"
    assert_every_row_once(out, tmp_path / "whole", rows)
