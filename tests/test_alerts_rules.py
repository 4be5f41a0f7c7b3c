"""The alert rules on synthetic figure series, and the engine's persistence and hysteresis.

Rules are pure functions of a window of figures, so each is checked on the shape of the failure it
names, and on the look-alikes it must not fire on (a healthy ReLU layer's 50% zeros, a shift that is
high but the layer's usual, a small value growing from smaller).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from icsmon.alerts.config import ConfigError, Thresholds, add_threshold_flags, load, thresholds_from_args
from icsmon.store import Store
from icsmon_agent.alerts import config as job_config
from icsmon_agent.alerts import rules
from icsmon_agent.alerts.engine import AlertEngine
from icsmon_agent.alerts.rules import Window
from icsmon_agent.protocol import STAT_INDEX, STATS, LayerInfo, Sample, Schema, schema_id_for

T = Thresholds()
KINDS = ("linear", "relu") * 4  # fc.0 relu.0 fc.1 relu.1 ...
NAMES = tuple(f"{'fc' if k == 'linear' else 'relu'}.{i // 2}" for i, k in enumerate(KINDS))


def healthy_row(rng: np.random.Generator) -> np.ndarray:
    """One sample of a healthy ReLU MLP: std ~1, ReLU half zeros, a few dead units, small shift."""
    row = np.full((len(KINDS), len(STATS)), np.nan)
    for i, kind in enumerate(KINDS):
        f = row[i]
        f[STAT_INDEX["std"]] = rng.uniform(0.5, 1.5)
        f[STAT_INDEX["mean"]] = rng.normal(0, 0.1)
        f[STAT_INDEX["max"]] = rng.uniform(3, 6)
        f[STAT_INDEX["zero_frac"]] = 0.5 if kind == "relu" else 0.0
        f[STAT_INDEX["dead_frac"]] = rng.uniform(0.0, 0.4)
        f[STAT_INDEX["nonfinite"]] = 0
        f[STAT_INDEX["shift"]] = rng.uniform(0.01, 0.05)
        f[STAT_INDEX["grad_norm"]] = rng.uniform(0.1, 1.0) if kind == "linear" else np.nan
    return row


def series(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([healthy_row(rng) for _ in range(n)])


def window(figs: np.ndarray, kinds: tuple[str, ...] = KINDS) -> Window:
    names = NAMES if kinds is KINDS else tuple(f"l{i}" for i in range(len(kinds)))
    return Window(names=names, kinds=kinds, figures=figs, step=figs.shape[0] - 1)


def set_(figs: np.ndarray, stat: str, layer: int | slice, value: float, t: int | slice = -1) -> np.ndarray:
    figs[t, layer, STAT_INDEX[stat]] = value
    return figs


def test_healthy_series_trips_no_rule() -> None:
    for seed in range(5):
        w = window(series(30, seed))
        for name, (rule, _, _) in rules.RULES.items():
            assert rule(w, T) is None, name


def test_nonfinite_names_the_first_layer_in_depth_order() -> None:
    figs = set_(series(5), "nonfinite", slice(5, 8), 12.0)
    found = rules.nonfinite(window(figs), T)
    assert found is not None and found.first == 5 and found.layers == (5, 6, 7)
    assert found.severity == "critical"


def test_vanishing_fires_on_collapse_with_depth_and_not_on_relu_zeros() -> None:
    figs = series(5)
    for i in range(4, 8):  # std collapses from layer 4 on, by orders of magnitude per layer
        set_(figs, "std", i, 10.0 ** -(i - 1))
    found = rules.vanishing(window(figs), T)
    assert found is not None and found.first == 4 and found.figure == "std"
    assert found.severity == "warning"  # 1e-3 of the layers before it; not yet below the floor
    set_(figs, "std", 7, 0.0)
    assert rules.vanishing(window(figs), T).severity == "critical"  # type: ignore[union-attr]


def test_vanishing_gradient() -> None:
    figs = set_(series(5), "grad_norm", 0, 1e-12)
    found = rules.vanishing(window(figs), T)
    assert found is not None and found.figure == "grad_norm" and found.first == 0


def test_dead_relu_needs_more_than_the_normal_share_of_silent_units() -> None:
    figs = set_(series(5), "dead_frac", 3, 0.45)  # deep He-init nets show this much at init: normal
    assert rules.dead_relu(window(figs), T) is None
    set_(figs, "dead_frac", 3, 0.8)
    found = rules.dead_relu(window(figs), T)
    assert found is not None and found.first == 3 and found.severity == "warning"
    set_(figs, "dead_frac", 3, 1.0)
    assert rules.dead_relu(window(figs), T).severity == "critical"  # type: ignore[union-attr]
    # A dead fc layer (not a ReLU) is not dead_relu: Linear outputs are negative half the time.
    set_(figs, "dead_frac", 2, 1.0)
    assert rules.dead_relu(window(figs), T).layers == (3,)  # type: ignore[union-attr]


def test_a_dead_layer_is_the_cause_not_vanishing_downstream() -> None:
    figs = series(5)
    set_(figs, "dead_frac", 3, 1.0)
    for i in range(3, 8):  # everything after a fully dead ReLU carries nothing
        set_(figs, "std", i, 0.0)
        set_(figs, "grad_norm", i, 0.0 if KINDS[i] == "linear" else np.nan)
    assert rules.dead_relu(window(figs), T) is not None
    assert rules.vanishing(window(figs), T) is None


def test_relu_after_a_vanished_input_is_vanishing_not_dead() -> None:
    figs = series(5)
    for i in range(2, 8):
        set_(figs, "std", i, 0.0)
        if KINDS[i] == "relu":
            set_(figs, "dead_frac", i, 1.0)
    assert rules.dead_relu(window(figs), T) is None
    found = rules.vanishing(window(figs), T)
    assert found is not None and found.first == 2


def test_saturation_only_on_tanh_and_sigmoid_layers() -> None:
    kinds = ("linear", "tanh", "linear", "sigmoid")
    figs = series(5)[:, :4].copy()
    set_(figs, "sat_frac", 1, 0.9)
    set_(figs, "sat_frac", 3, 0.1)
    found = rules.saturation(window(figs, kinds), T)
    assert found is not None and found.layers == (1,) and found.severity == "critical"


def test_exploding_on_level_and_on_a_sudden_jump_but_not_on_slow_growth() -> None:
    figs = series(12)
    set_(figs, "std", 2, 5e3, slice(None))  # high all along: the level, not a jump
    found = rules.exploding(window(figs), T)
    assert found is not None and found.first == 2 and found.severity == "warning"
    # A diverging run: finite, but 30x the layer's own recent median in one sample.
    figs = series(12)
    set_(figs, "std", 4, 30.0)
    found = rules.exploding(window(figs), T)
    assert found is not None and found.first == 4 and "median" in found.detail
    # Tiny values growing 100x stay tiny: not an explosion.
    figs = series(12)
    set_(figs, "std", 4, 1e-5, slice(0, -1))
    set_(figs, "std", 4, 1e-3)
    assert rules.exploding(window(figs), T) is None
    # Doubling over a few samples is training, not divergence.
    figs = series(12)
    figs[:, 4, STAT_INDEX["std"]] = np.linspace(1.0, 2.0, 12)
    assert rules.exploding(window(figs), T) is None


def test_exploding_gradient_jump() -> None:
    """A gradient norm far above its level two samples in a row; one spike is a hard batch."""
    figs = set_(series(12), "grad_norm", 0, 500.0)
    assert rules.exploding(window(figs), T) is None
    set_(figs, "grad_norm", 0, 300.0, t=-2)
    found = rules.exploding(window(figs), T)
    assert found is not None and found.figure == "grad_norm" and found.severity == "critical"


def test_a_gradient_jump_is_judged_against_the_runs_early_scale_too() -> None:
    """Late in a healthy run the recent median collapses (1e-3); a hard batch's norm (2-5) two
    samples running is still below where the run began, so it is not an explosion."""
    figs = set_(series(12), "grad_norm", 0, 1e-3, t=slice(None))
    set_(figs, "grad_norm", 0, 3.0, t=slice(-2, None))
    assert rules.exploding(window(figs), T) is not None  # against the collapsed median alone
    early = np.full((figs.shape[1], figs.shape[2]), np.nan)
    early[0, STAT_INDEX["grad_norm"]] = 5.0
    w = rules.Window(window(figs).names, window(figs).kinds, figs, figs.shape[0] - 1, early=early)
    assert rules.exploding(w, T) is None


def test_an_exactly_constant_output_is_not_vanishing() -> None:
    """A zero-init residual BatchNorm (gamma 0) outputs exactly 0 by design; a collapse passes
    through tiny stds on its way."""
    figs = series(12)
    for stat in ("std", "min", "max", "mean"):
        set_(figs, stat, 2, 0.0, t=slice(None))
    assert rules.vanishing(window(figs), T) is None
    set_(figs, "std", 2, 1e-14, t=slice(None))  # tiny but not constant: a collapse
    assert rules.vanishing(window(figs), T) is not None


def test_shift_is_judged_against_the_layers_own_level() -> None:
    figs = series(25)
    figs[:, 2, STAT_INDEX["shift"]] = 2.0  # high but usual for this layer
    assert rules.shift(window(figs), T) is None
    set_(figs, "shift", 0, 3.0)  # 60-300x this layer's usual
    found = rules.shift(window(figs), T)
    assert found is not None and found.layers == (0,)
    # Not before enough history (shift is noisy while training starts)...
    assert rules.shift(window(figs[-5:]), T) is None
    # ...and not on activation layers, whose shift mirrors their input (and flips with dead units).
    figs = set_(series(25), "shift", 1, 1e6)
    assert rules.shift(window(figs), T) is None


# --------------------------------------------------------------------------------- the engine


class EngineBench:
    """A real Store fed synthetic samples, one at a time, with the engine run after each."""

    def __init__(self, thresholds: Thresholds | None = None) -> None:
        self.layers = tuple(LayerInfo(n, "X", (8,), k) for n, k in zip(NAMES, KINDS, strict=True))
        self.sid = schema_id_for(self.layers)
        self.store = Store()
        self.store.add(Schema("run", 0, 1, 0.0, self.layers, name="job", schema_id=self.sid))
        self.engine = AlertEngine(thresholds)
        self.seq = 1
        self.rng = np.random.default_rng(0)

    def push(
        self, row: np.ndarray | None = None, step: int | None = None, loss: float = 1.0, **scalars: float
    ) -> list[str]:
        self.seq += 1
        row = healthy_row(self.rng) if row is None else row
        s = step if step is not None else self.seq
        sample = Sample("run", 0, self.seq, 0.0, s, self.sid, row.astype(np.float32), loss, scalars=scalars)
        assert self.store.add(sample)
        run = self.store.get("run")
        assert run is not None
        return [
            ("-" if c.cleared else "+") + c.alert.rule + ("" if c.cleared else f":{c.alert.severity}")
            for c in self.engine.update(run)
        ]


def dead(rng: np.random.Generator, frac: float) -> np.ndarray:
    row = healthy_row(rng)
    row[3, STAT_INDEX["dead_frac"]] = frac
    return row


def test_engine_fires_after_persistence_and_clears_after_recovery() -> None:
    feed = EngineBench()
    rng = np.random.default_rng(1)
    out = [feed.push(dead(rng, 0.8)) for _ in range(3)]
    assert out == [[], [], ["+dead_relu:warning"]]
    assert [a.rule for a in feed.engine.active] == ["dead_relu"]
    alert = feed.engine.active[0]
    assert alert.layer == "relu.1" and alert.run == "run" and "dead_frac 0.8" in alert.message
    assert f"step {alert.step}" in alert.message and alert.hint
    # A flicker back to normal for a sample or two does not clear it...
    assert feed.push() == [] and feed.push(dead(rng, 0.8)) == []
    # ...five calm samples do.
    out = [feed.push() for _ in range(5)]
    assert out == [[], [], [], [], ["-dead_relu"]]
    assert feed.engine.active == []
    assert [c.cleared for c in feed.engine.history] == [False, True]


def test_a_single_odd_sample_raises_nothing_but_critical_and_nonfinite_fire_at_once() -> None:
    feed = EngineBench()
    rng = np.random.default_rng(2)
    assert feed.push(dead(rng, 0.8)) == []
    assert feed.push(dead(rng, 1.0)) == ["+dead_relu:critical"]
    row = healthy_row(rng)
    row[5, STAT_INDEX["nonfinite"]] = 3
    assert "+nonfinite:critical" in feed.push(row)
    assert feed.engine.active[0].layer == NAMES[5] or feed.engine.active[0].rule == "dead_relu"


def test_a_warning_that_turns_critical_fires_again() -> None:
    feed = EngineBench()
    rng = np.random.default_rng(3)
    for _ in range(3):
        feed.push(dead(rng, 0.8))
    assert feed.push(dead(rng, 0.99)) == ["+dead_relu:critical"]
    assert len(feed.engine.active) == 1 and feed.engine.active[0].severity == "critical"


def test_alert_json_is_the_tail_contract() -> None:
    feed = EngineBench()
    rng = np.random.default_rng(4)
    feed.push(dead(rng, 1.0), step=40)
    (change,) = feed.engine.history
    doc = change.to_json()
    assert {k: doc[k] for k in ("type", "rule", "layer", "step", "severity")} == {
        "type": "alert",
        "rule": "dead_relu",
        "layer": "relu.1",
        "step": 40,
        "severity": "critical",
    }
    assert doc["value"] == 1.0 and doc["message"] and doc["hint"] and doc["run"] == "run"


def test_thresholds_change_what_fires() -> None:
    feed = EngineBench(Thresholds(dead_frac=0.9, dead_frac_critical=0.99, fire_after=1))
    rng = np.random.default_rng(5)
    assert feed.push(dead(rng, 0.8)) == []
    assert feed.push(dead(rng, 0.95)) == ["+dead_relu:warning"]


# --------------------------------------------------------------------------------- config


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_threshold_flags(p)
    return p.parse_args(argv)


def test_config_precedence_flags_over_cwd_over_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user = tmp_path / "xdg"
    (user / "icsmon").mkdir(parents=True)
    (user / "icsmon" / "icsmon.toml").write_text("[alerts]\ndead_frac = 0.8\nshift_min = 2.0\nwindow = 4\n")
    cwd = tmp_path / "project"
    cwd.mkdir()
    (cwd / "icsmon.toml").write_text("[alerts]\nshift_min = 3.0\n")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(user))
    monkeypatch.chdir(cwd)
    t = thresholds_from_args(parse("--window", "6"))
    assert (t.dead_frac, t.shift_min, t.window) == (0.8, 3.0, 6)
    assert isinstance(t.window, int)
    assert thresholds_from_args(parse()) == Thresholds(dead_frac=0.8, shift_min=3.0, window=4)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[alerts]\nno_such = 1\n", "unknown threshold 'no_such'"),
        ("[alerts]\ndead_frac = 'high'\n", "must be a number"),
        ("[alerts]\nwindow = 2.5\n", "whole number"),
        ("[alerts\n", "not valid TOML"),
        ("[alerts]\nexplode_jump = -1\n", "must be positive"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "icsmon.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=says):
        load([path])


def test_hints_are_written_from_the_network_they_are_about() -> None:
    """The same rule, two networks: a 3-layer ReLU MLP without normalisation is told to normalise
    and of He init, with its depth; a BatchNorm net is not told to add what it has."""
    from icsmon_agent.alerts.hints import hint

    figs = series(12)
    plain = hint("exploding", window(figs, ("linear", "relu", "linear", "relu", "linear")), "")
    normed = hint("exploding", window(figs, ("conv", "norm", "relu", "conv", "norm")), "")
    assert "3-layer" in plain and "He init" in plain and "normalise" in plain
    assert "normalis" not in normed and "learning rate" in normed
    assert "50-layer" not in plain + normed


def test_a_spike_is_judged_against_the_runs_own_recent_distribution() -> None:
    """The loss above its median + 6 robust deviations over its last 128 samples."""
    rng = np.random.default_rng(0)
    figs = series(12)
    losses = 2.0 + 0.05 * rng.standard_normal(100)
    w = rules.Window(window(figs).names, window(figs).kinds, figs, 99, losses=losses)
    assert rules.spike(w, T) is None
    losses[-1] = 3.0  # 20 sigma
    w = rules.Window(window(figs).names, window(figs).kinds, figs, 99, losses=losses)
    found = rules.spike(w, T)
    assert found is not None and found.figure == "loss" and found.value == 3.0
    assert (
        rules.spike(rules.Window(w.names, w.kinds, figs, 10, losses=losses[-11:]), T) is None
    )  # too little history


def test_the_early_scale_is_the_oldest_samples_held_even_when_history_arrives_at_once() -> None:
    """A viewer that joins late gets the history in one batch and runs the rules once: the early
    scale is still the run's oldest samples (gradient norm 5), so a late hard batch (3, two
    samples, against a collapsed recent median of 1e-3) is no explosion."""
    feed = EngineBench()
    grad = STAT_INDEX["grad_norm"]
    rows = []
    for k in range(60):
        row = healthy_row(feed.rng)
        row[:, grad] = 5.0 if k < 20 else 1e-3
        rows.append(row)
    rows[-1][:, grad] = rows[-2][:, grad] = 3.0
    for row in rows:  # stored without running the rules: as one received batch
        feed.seq += 1
        assert feed.store.add(
            Sample("run", 0, feed.seq, 0.0, feed.seq, feed.sid, row.astype(np.float32), 1.0)
        )
    run = feed.store.get("run")
    assert run is not None
    assert [c.alert.rule for c in feed.engine.update(run)] == []


def test_thresholds_refuse_a_history_longer_than_its_window() -> None:
    with pytest.raises(job_config.ConfigError, match="shift_min_history"):
        Thresholds(shift_min_history=30, shift_window=20).validate()
