"""The results table: per method over every student of every init draw, and each baseline's
paired difference from the run's method with its standard error over draws."""

from __future__ import annotations

import math
import statistics

import pytest

from tsgd_ray.stages.pipeline import by_method, results_rows, results_table, verdict


def _arm(method: str, draw: int, top1: list[float], ipc=1) -> dict:
    return {
        "method": method,
        "draw": draw,
        "ipc": ipc,
        "seeds": list(range(len(top1))),
        "top1": top1,
        "top5": [min(1.0, t + 0.3) for t in top1],
        "top1_mean": statistics.fmean(top1),
        "top5_mean": statistics.fmean(min(1.0, t + 0.3) for t in top1),
        "teacher_top1": 0.9,
    }


TSGD = [[0.30, 0.34], [0.20, 0.22], [0.41, 0.39]]  # per draw, two seeds
RANDOM = [[0.25, 0.27], [0.21, 0.19], [0.30, 0.32]]


def test_paired_difference_is_over_draws_of_the_per_draw_means():
    results = [_arm("tsgd", d, t) for d, t in enumerate(TSGD)] + [
        _arm("random_real", d, t) for d, t in enumerate(RANDOM)
    ]
    results.append(_arm("full", 0, [0.8, 0.82], ipc=None))
    tsgd, random, full = by_method(results)
    gaps = [statistics.fmean(a) - statistics.fmean(b) for a, b in zip(TSGD, RANDOM)]  # 0.06, 0.01, 0.09
    assert random["difference"]["mean"] == pytest.approx(statistics.fmean(gaps))
    assert random["difference"]["se"] == pytest.approx(statistics.stdev(gaps) / math.sqrt(3))
    assert random["difference"]["draws"] == 3 and tsgd["difference"] is None and full["difference"] is None
    assert tsgd["top1_mean"] == pytest.approx(statistics.fmean(v for d in TSGD for v in d))  # every student
    assert tsgd["top1_std"] == pytest.approx(statistics.stdev(v for d in TSGD for v in d))
    assert (tsgd["draws"], tsgd["seeds"], full["draws"]) == ([0, 1, 2], 2, [0])
    # +5.3 +- 2.3 points: more than 2 SE from 0 over 3 draws
    assert verdict(random["difference"]) == "separated"
    table = results_table(results).splitlines()
    assert table[0].startswith("| method | IPC | top-1 % | top-5 % | draws x seeds | tsgd - method")
    assert table[3] == "| random_real | 1 | 25.7 +- 5.0 | 55.7 +- 5.0 | 3 x 2 | +5.3 +- 2.3: separated |"
    assert table[4].endswith("| 1 x 2 | (every real clip: not paired) |")
    rows = results_rows(results)
    assert rows[1]["difference"] == pytest.approx(5.33, abs=0.01) and rows[1]["draws"] == 3


def test_a_difference_within_two_se_or_over_too_few_draws_does_not_separate():
    noisy = [[0.30], [0.10], [0.35]]
    results = [_arm("tsgd", d, t) for d, t in enumerate(noisy)] + [
        _arm("random_real", d, t) for d, t in enumerate(RANDOM)
    ]
    assert verdict(by_method(results)[1]["difference"]).startswith("not separated")
    two = [r for r in results if r["draw"] < 2]
    assert verdict(by_method(two)[1]["difference"]) == "too few draws to separate (evaluate.draws >= 3)"
    one = [r for r in results if r["draw"] == 0]
    assert by_method(one)[1]["difference"]["se"] is None
    assert results_table(one).splitlines()[3].endswith(": too few draws to separate (evaluate.draws >= 3) |")
