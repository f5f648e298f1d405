"""tests/launch.py: results in rank order, and a failing rank's traceback in the failure message."""

import pytest

from launch import run_script


def test_results_come_back_in_rank_order(tmp_path):
    assert run_script("two_ranks.py", "-1", out=tmp_path, ranks=2).results == [{"rank": 0}, {"rank": 1}]


@pytest.mark.parametrize("failing", [0, 1])
def test_a_failing_rank_reports_its_traceback(tmp_path, failing):
    with pytest.raises(AssertionError) as info:
        run_script("two_ranks.py", str(failing), out=tmp_path, ranks=2)
    message = str(info.value)
    assert f"--- rank{failing} failed:\nTraceback" in message
    assert f"RuntimeError: rank {failing} fails on purpose" in message
    assert "exited with 1" in message and f"no result from rank(s) [{failing}]" in message
    assert run_script("two_ranks.py", str(failing), out=tmp_path / "again", ranks=2, check=False).returncode == 1
