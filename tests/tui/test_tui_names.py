"""Names are data: a layer or job name is shown as written, never as markup, an action or a control code."""

from __future__ import annotations

import dataclasses

import numpy as np
from screen_text import screen_text, until
from synthetic import filled_feed, messages

from icsmon.printing import alert_lines
from icsmon.render import sample_line
from icsmon.tui.app import IcsmonApp
from icsmon.tui.screens.main import MainScreen
from icsmon_agent.alerts.model import Alert, AlertChange
from icsmon_agent.protocol import LayerInfo, Sample, Schema

HOSTILE = ("[/]", "[b]bold[/b]", "[@click=app.quit]x", "evil\x1b]0;pwned\x07", "cr\rlf\n")


def hostile_messages() -> list[object]:
    msgs = messages(n_layers=6, n_samples=20, nan_from=1, name="job\x1b[2J")
    schema = msgs[0]
    assert isinstance(schema, Schema)
    layers = tuple(
        LayerInfo(
            HOSTILE[i - 1] if 1 <= i <= len(HOSTILE) else layer.name, "Lin[/]ear", layer.shape, layer.kind
        )
        for i, layer in enumerate(schema.layers)
    )
    from icsmon_agent.protocol import schema_id_for

    sid = schema_id_for(layers)
    out: list[object] = [dataclasses.replace(schema, layers=layers, schema_id=sid)]
    out += [dataclasses.replace(m, schema_id=sid) for m in msgs[1:] if isinstance(m, Sample)]
    return out


async def test_hostile_layer_names_are_shown_literally_and_a_critical_toast_on_them_does_not_crash() -> None:
    feed = filled_feed(hostile_messages())  # type: ignore[arg-type]
    app = IcsmonApp(feed, live=False)
    async with app.run_test(size=(160, 40)) as pilot:
        await pilot.pause()
        app._tick(force=True)  # the alert changes (NaN from the layer named "[/]"): a critical toast
        await until(pilot, lambda: app.toasts >= 1, "the critical toast")
        assert isinstance(app.screen, MainScreen) and app.is_running
        text = screen_text(app)
        for shown in ("[/]", "[b]bold[/b]", "[@click=app.quit]x", "evil\\x1b]0;pwned\\x07", "Lin[/]ear"):
            assert shown in text, (shown, text)
        assert "\x1b" not in text and "job\\x1b[2J" in text
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"click")
        await until(pilot, lambda: "[@click=app.quit]x" in screen_text(app), "the palette's match")
        assert app.is_running


def test_tail_writes_no_control_code_of_a_name() -> None:
    msgs = hostile_messages()
    schema, sample = msgs[0], msgs[-1]
    assert isinstance(schema, Schema) and isinstance(sample, Sample)
    line = sample_line(sample, schema)
    assert ("\x1b" not in line and "\\x1b" in line) or "evil" not in line
    alert = Alert(
        "nonfinite",
        HOSTILE[3],
        3,
        5,
        "critical",
        float("nan"),
        f"NaN at {HOSTILE[3]}",
        "hint\x1b[31m",
        run="r\x07",
    )
    for change in (AlertChange(alert), AlertChange(alert, cleared=True, step=9)):
        text = "\n".join(alert_lines(change))
        assert not any(ch in text for ch in "\x1b\x07\r") and "\\x1b" in text
    assert np.isnan(alert.value)
