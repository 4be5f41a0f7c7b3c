"""Every demo scenario, run for real: `icsmon demo SCENARIO --headless --json` trains the network in
a subprocess with the agent, and the alert lines it prints are checked against what the scenario is
meant to show (and the healthy one must show nothing at all)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from helpers import icsmon, json_lines
from icsmon.demo.scenarios import DEFAULT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def demo(env: dict[str, str], scenario: str, *args: str, timeout: float = 110) -> list[dict[str, Any]]:
    proc = icsmon("demo", scenario, "--headless", "--json", *args, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return json_lines(proc.stdout)


def alerts(lines: list[dict[str, Any]], run_prefix: str = "") -> list[dict[str, Any]]:
    return [a for a in lines if a["type"] == "alert" and a["run"].startswith(run_prefix)]


def summary(lines: list[dict[str, Any]], net: str) -> dict[str, Any]:
    (found,) = [s for s in lines if s["type"] == "run_summary" and s["net"] == net]
    return found


def layer_index(name: str) -> int:
    return int(name)  # the demo nets are nn.Sequential: layer names are their indices


def test_healthy_raises_no_alert_over_hundreds_of_steps(env: dict[str, str]) -> None:
    lines = demo(env, "healthy", "--steps", "300", "--every", "2")
    samples = [s for s in lines if s["type"] == "sample"]
    assert len(samples) >= 140  # every sample of the run was seen, so silence means something
    # The look-alikes are there: ReLU layers half zeros, yet nothing is called dead.
    assert max(f["zero_frac"] for f in samples[-1]["layers"].values()) > 0.4
    assert alerts(lines) == []


def test_vanishing_fires_where_the_signal_collapses(env: dict[str, str]) -> None:
    lines = demo(env, "vanishing", "--steps", "12")
    found = alerts(lines)
    assert [a["rule"] for a in found] == ["vanishing"]
    (a,) = found
    # Weights N(0, 0.01^2) shrink the signal ~9x a layer: 1e-3 of the input's scale a few layers in.
    assert 3 <= layer_index(a["layer"]) <= 12 and a["figure"] == "std"
    assert a["step"] <= 4  # present from step 0: fires after `fire_after` samples
    assert a["severity"] == "critical" and len(a["layers"]) > 80
    assert "init" in a["hint"]


def test_exploding_fires_before_the_loss_is_nonfinite(env: dict[str, str]) -> None:
    lines = demo(env, "exploding")
    nan_step = summary(lines, "exploding")["first_nonfinite_loss_step"]
    assert nan_step is not None  # the run does diverge
    first: dict[str, dict[str, Any]] = {}
    for a in alerts(lines):
        first.setdefault(a["rule"], a)
    assert first["exploding"]["step"] < nan_step
    # It escalates to critical before the loss turns non-finite too. (Whether the very first
    # exploding alert is already critical depends on the platform's float rounding of the run.)
    critical = [a for a in alerts(lines) if a["rule"] == "exploding" and a["severity"] == "critical"]
    assert critical and critical[0]["step"] < nan_step
    assert first["nonfinite"]["step"] >= first["exploding"]["step"]
    assert "learning rate" in first["exploding"]["hint"]
    # Healthy for ~100 steps first: nothing fires at the start.
    assert min(a["step"] for a in alerts(lines)) > 50


def test_saturating_fires_on_the_tanh_layers(env: dict[str, str]) -> None:
    lines = demo(env, "saturating", "--steps", "12")
    found = alerts(lines)
    assert [a["rule"] for a in found] == ["saturation"]
    # nn.Sequential(Linear, Tanh, Linear, Tanh, ...): the tanh layers are the odd indices.
    assert {layer_index(n) % 2 for n in found[0]["layers"]} == {1}
    assert len(found[0]["layers"]) == 6


def test_dead_fires_on_relu_layers_not_vanishing(env: dict[str, str]) -> None:
    lines = demo(env, "dead", "--steps", "12")
    found = alerts(lines)
    assert [a["rule"] for a in found] == ["dead_relu"]
    assert {layer_index(n) % 2 for n in found[0]["layers"]} == {1}  # ReLUs only
    assert found[0]["severity"] == "critical" and "bias" in found[0]["hint"]


@pytest.mark.parametrize("threads", ["1", "2"])
def test_the_default_story_holds_whatever_the_threads(env: dict[str, str], threads: str) -> None:
    """The demo a newcomer sees first: the uncapped warm-up is named exploding before its loss is
    NaN, the capped twin never raises a warning, with one torch thread or two."""
    assert DEFAULT == "warmup"
    lines = demo(env, DEFAULT, "--threads", threads, timeout=110)
    nan = summary(lines, "uncapped")["first_nonfinite_loss_step"]
    assert nan is not None and summary(lines, "capped")["first_nonfinite_loss_step"] is None
    uncapped = {a["rule"]: a for a in reversed(alerts(lines, "uncapped"))}  # the first of each rule
    assert uncapped["exploding"]["step"] < nan and uncapped["exploding"]["layer"]
    assert alerts(lines, "capped") == []


def test_normalization_plain_explodes_batchnorm_survives(env: dict[str, str]) -> None:
    """At lr 2.0 the plain net gives way and the BatchNorm net trains on. Which way the plain one
    goes hangs on the CPU's rounding (the same code, another machine): mostly it explodes, and then
    `exploding` comes before its first NaN; else its ReLUs die first and it sits at chance, said by
    dead_relu or vanishing. Either way it is named; the BatchNorm run never is."""
    lines = demo(env, "normalization", "--steps", "170")
    plain_nan = summary(lines, "plain")["first_nonfinite_loss_step"]
    assert summary(lines, "batchnorm")["first_nonfinite_loss_step"] is None
    plain = {a["rule"]: a for a in reversed(alerts(lines, "plain"))}  # first of each rule
    if plain_nan is not None:
        assert plain["exploding"]["step"] < plain_nan
    else:
        assert plain.keys() & {"dead_relu", "vanishing"}, plain
    bn = {a["rule"] for a in alerts(lines, "batchnorm")}
    assert not bn & {"exploding", "nonfinite", "vanishing"}


def test_demo_list_and_bad_usage(env: dict[str, str]) -> None:
    proc = icsmon("demo", "--list", env=env, check=True)
    for name in ("healthy", "vanishing", "exploding", "saturating", "dead", "warmup", "normalization"):
        assert f"\n  {name}" in proc.stdout
    assert "(default)" in proc.stdout
    bad = icsmon("demo", "nosuch", "--headless", env=env)
    assert (
        bad.returncode == 1
        and bad.stderr.startswith("icsmon: unknown scenario")
        and "Traceback" not in bad.stderr
    )
    assert icsmon("demo", "--steps", "x", env=env).returncode == 2


def test_rules_prints_thresholds_and_takes_flags(env: dict[str, str]) -> None:
    proc = icsmon("rules", "--dead-frac", "0.8", env=env, check=True)
    assert "dead_relu" in proc.stdout and "dead_frac             0.8" in proc.stdout
    bad = icsmon("rules", "--explode-jump", "-2", env=env)
    assert bad.returncode == 1 and "must be positive" in bad.stderr


def test_the_demo_without_torch_says_what_to_install(env: dict[str, str]) -> None:
    """The viewer's own install has no torch: one line says so, no traceback."""
    code = "import sys; sys.modules['torch'] = None; from icsmon.cli import main; sys.exit(main(['demo', '--headless']))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.startswith("icsmon: the demo trains its networks with PyTorch")
        and "pip install torch" in proc.stderr
    )
