"""The soak (``python -m bench soak``): its verdict and frames on their own, then a 2-minute
run against a real tunnel process (marked slow: ``-m "not slow"`` leaves it out).

The 2-minute run must end with no error of any kind, every kind of traffic exercised, the
descriptors of the tunnel at rest back to the same count after every period (drift 0) and RSS
drift under the bound ``bench.soak`` documents. The verdict tests show that an error or a drift
past either bound does fail the run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from bench import soak

REPO = Path(__file__).resolve().parent.parent
SOAK_MINUTES = 2
SOAK_TIMEOUT = SOAK_MINUTES * 60 + 180
"""The run, its warm-up, the waits at rest after each period and start and stop, generously."""


def _result(
    samples: list[tuple[float, int, int]], errors: Counter[str] | None = None
) -> soak.SoakResult:
    counters = soak.Counters(upgrades=100, errors=errors or Counter())
    return soak.SoakResult(
        soak.SoakOptions(seconds=120),
        counters,
        [soak.Sample(at, fds, rss) for at, fds, rss in samples],
        120.0,
        "",
    )


def test_slope_is_the_least_squares_line() -> None:
    assert soak.slope([(0, 1.0), (1, 3.0), (2, 5.0)]) == pytest.approx(2.0)
    assert soak.slope([(0, 4.0), (1, 6.0), (2, 4.0), (3, 6.0)]) == pytest.approx(0.4)
    assert soak.slope([(0, 7.0)]) == 0.0
    assert soak.slope([(1, 7.0), (1, 9.0)]) == 0.0


def test_steady_samples_pass() -> None:
    result = _result([(0, 13, 45000), (60, 13, 45100), (120, 13, 45150)])
    assert result.fd_drift == 0.0
    assert result.passed
    assert "verdict: pass" in result.report()


@pytest.mark.parametrize(
    ("samples", "errors", "why"),
    [
        ([(0, 13, 45000), (60, 13, 45000)], Counter(echo=1), "an error"),
        ([(0, 13, 45000), (60, 14, 45000), (120, 15, 45000)], None, "a descriptor a minute"),
        ([(0, 13, 45000), (60, 13, 46100), (120, 13, 47200)], None, "1.1 MiB a minute"),
        ([(0, 13, 45000)], None, "a single sample"),
    ],
)
def test_errors_or_drift_fail_the_run(
    samples: list[tuple[float, int, int]], errors: Counter[str] | None, why: str
) -> None:
    result = _result(samples, errors)
    assert not result.passed, why
    assert "verdict: FAIL" in result.report()


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_masked_frames_unmask_to_their_payload(size: int) -> None:
    payload = os.urandom(size)
    frame = soak.masked_frame(payload)
    assert frame[0] == 0x82
    assert frame[1] & 0x80
    length, offset = frame[1] & 0x7F, 2
    if length == 126:
        length, offset = int.from_bytes(frame[2:4], "big"), 4
    elif length == 127:
        length, offset = int.from_bytes(frame[2:10], "big"), 10
    mask, body = frame[offset : offset + 4], frame[offset + 4 :]
    assert length == size == len(body)
    assert bytes(b ^ mask[i % 4] for i, b in enumerate(body)) == payload


def test_periods_give_short_runs_samples() -> None:
    assert soak.period_seconds(20) == 5.0
    assert soak.period_seconds(120) == 30.0
    assert soak.period_seconds(3600) == 60.0


@pytest.mark.slow
def test_two_minute_soak_has_no_errors_and_no_drift(tmp_path: Path) -> None:
    if shutil.which(os.environ.get("CC", "gcc")) is None:
        pytest.skip("gcc not installed (apt-get install gcc)")
    out = tmp_path / "soak.json"
    command = [sys.executable, "-m", "bench", "soak", "--minutes", str(SOAK_MINUTES)]
    result = subprocess.run(
        [*command, "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=SOAK_TIMEOUT,
        check=False,
    )
    print(result.stdout)
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["errors"] == {}, result.stdout
    assert "bytes checked" in result.stderr  # the progress lines
    assert "at rest after" in result.stderr
    for kind in ("upgrades", "messages", "bytes_checked", "resets", "admin_closes", "reloads"):
        assert report[kind] > 0, kind
    assert len(report["samples"]) >= 4
    assert abs(report["fd_drift_per_min"]) <= soak.FD_DRIFT_BOUND
    assert report["rss_drift_kib_per_min"] <= soak.RSS_DRIFT_BOUND_KIB
    assert report["passed"]
    assert result.returncode == 0, result.stdout + result.stderr
