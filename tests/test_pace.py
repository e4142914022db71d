"""run/pace.py: per-core paces over time and the lockstep ceiling."""
import numpy as np
import pytest

from .conftest import run_script


@pytest.fixture(scope="module")
def pace():
    return run_script("pace")


def samples(times, paces):
    return np.column_stack([times, paces]).astype(float)


def test_cores_slow_in_turn_cap_a_lockstep_program(pace):
    # 4 s sampled every 0.1 s; core 0 slow (20 µs) in the second half, core 1 in the first
    t = 100.0 + 0.1 * np.arange(40)
    first = t < 102.0
    records = [samples(t, np.where(first, 10.0, 20.0)), samples(t, np.where(first, 20.0, 10.0))]
    summary = pace.summarise(records, 0.5)
    # every bin: mean pace 15, slowest 20
    assert summary["ceiling"] == pytest.approx(0.75)
    np.testing.assert_allclose(summary["slow_share"], [0.5, 0.5], atol=0.08)
    assert summary["fastest"] == pytest.approx(10.0)
    lines = pace.report(summary, 0.5)
    assert any("correlation" in line and "-1.00" in line for line in lines)


def test_cores_at_one_speed_lose_nothing_and_bins_without_samples_are_dropped(pace):
    t = 5.0 + 0.1 * np.arange(30)
    records = [samples(t, np.full(30, 12.0)), samples(t[t < 6.0], np.full(10, 12.0))]
    summary = pace.summarise(records, 0.25)
    assert summary["ceiling"] == pytest.approx(1.0)
    assert len(summary["paces"]) == 3  # only while both cores were sampled: [5.0, 5.9]
    assert not summary["slow_share"].any()


def test_too_short_a_run_for_one_bin_is_an_error(pace):
    t = np.array([0.0, 0.1])
    with pytest.raises(ValueError, match="less than one bin"):
        pace.summarise([samples(t, [1.0, 1.0])] * 2, 1.0)


def test_one_core_sampled_for_real(pace, capsys):
    pace.main(["--cores", "1", "--seconds", "0.6", "--bin", "0.2"])
    out = capsys.readouterr().out
    assert "core 0: median" in out
    assert "lockstep ceiling: 1.000" in out  # one core is its own slowest


@pytest.mark.parametrize("args", [["--cores", "0"], ["--seconds", "1", "--bin", "2"],
                                  ["--cores", "100000"]])
def test_bad_arguments_name_the_option(pace, args, capsys):
    with pytest.raises(SystemExit):
        pace.main(args)
    assert args[0] in capsys.readouterr().err
