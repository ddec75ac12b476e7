"""PhaseTimer: laps and blocks into named phases, take and reset."""
import time

import pytest

from hpctrain.timing import PhaseTimer


def test_laps_fill_named_phases():
    t = PhaseTimer(("dedup", "lookup"))
    assert t.seconds == {"dedup": 0.0, "lookup": 0.0}
    t.start()
    time.sleep(0.01)
    t.lap("dedup")
    t.lap("lookup")
    t.lap("extra")            # a phase not named up front appears when timed
    assert t.seconds["dedup"] >= 0.009 and set(t.seconds) == {"dedup", "lookup", "extra"}
    t.start()
    t.lap("dedup")
    assert t.seconds["dedup"] >= 0.009          # accumulated, not replaced
    held = t.seconds
    t.reset()
    assert held is t.seconds and t.seconds == {"dedup": 0.0, "lookup": 0.0}


def test_blocks_add_up_and_nest_and_take_starts_over():
    t = PhaseTimer()
    with t("dense") as same:
        assert same is t
        with t("inner"):
            time.sleep(0.01)
    with t("dense"):
        pass
    t.add("dense", 1.0)
    out = t.take()
    assert out["dense"] >= 1.01 and out["inner"] >= 0.009
    assert out["dense"] >= out["inner"] + 1.0
    assert t.take() == {} and t.seconds == {}


def test_block_records_when_its_body_raises():
    t = PhaseTimer()
    with pytest.raises(KeyError):
        with t("data"):
            raise KeyError("x")
    assert t.seconds["data"] >= 0.0


def test_the_trainer_uses_the_same_class():
    from hpctrain.train import metrics
    assert metrics.PhaseTimer is PhaseTimer
