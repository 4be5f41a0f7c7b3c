"""The app against a real agent in a real PyTorch training subprocess: waiting, live, lost, re-attach,
ended. Every wait is for a condition on the app's own widgets and state, with a deadline."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from screen_text import screen_text, until

from icsmon.feed import Feed
from icsmon.targets import resolve_local
from icsmon.tui.app import IcsmonApp
from icsmon.tui.widgets.layer_table import LayerTable

pytestmark = pytest.mark.slow  # real processes: `make check` leaves it out

SCRIPT = textwrap.dedent(
    """
    import sys, time
    import torch
    from torch import nn
    import icsmon_agent

    torch.manual_seed(0)
    torch.set_num_threads(1)
    layers = []
    for i in range(12):
        layers += [nn.Linear(32, 32), nn.ReLU()]
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)   # the seed's vanishing net, small
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    mon = icsmon_agent.watch(model, every=1, name="tui-live")
    steps = int(sys.argv[1])
    for step in range(steps):
        loss = model(torch.randn(16, 32)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        mon.step(loss=loss)
        time.sleep(0.02)
    mon.close()
    """
)
N_LAYERS = 24


def start(tmp_path: Path, env: dict[str, str], steps: int) -> subprocess.Popen[bytes]:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    return subprocess.Popen([sys.executable, str(script), str(steps)], env=env)


@pytest.mark.timeout(110)
async def test_waiting_live_lost_reattach_ended(tmp_path: Path, env: dict[str, str]) -> None:
    feed = Feed(lambda: resolve_local(None).endpoints, lost_after=30.0)
    app = IcsmonApp(feed)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            # Nothing runs yet: the waiting view says so and what to do.
            await until(pilot, lambda: feed.attempts > 0 and bool(feed.error), "the first connect attempt")
            text = screen_text(app)
            assert "Waiting for a training job" in text and "icsmon_agent.watch(model)" in text
            table = app.screen.query_one(LayerTable)
            assert not table.display

            procs.append(start(tmp_path, env, 100_000))
            await until(pilot, lambda: table.display and table.row_count == N_LAYERS, "the layer table")
            await until(pilot, lambda: feed.state(app.view_state.current(feed)) == "live", "live")
            first = app.view_state.current(feed)
            assert first is not None and first.schema is not None and first.schema.pid == procs[0].pid
            # The std sparkline of the first layer is drawn from real samples.
            await until(pilot, lambda: first.count >= 10, "ten samples")
            await until(
                pilot, lambda: any(ch in table.cell_text(0, "spark") for ch in "▁▂▃▄▅▆▇█"), "the sparkline"
            )
            assert "● live" in screen_text(app) and "tui-live" in screen_text(app)

            # The job dies without a word: the viewer says "lost" (its pid is gone).
            procs[0].kill()
            procs[0].wait()
            await until(pilot, lambda: feed.state(first) == "lost", "lost", timeout=20)
            await until(pilot, lambda: "● lost" in screen_text(app), "lost on screen", timeout=5)

            # The same job comes back: the app re-attaches by itself.
            procs.append(start(tmp_path, env, 400))
            await until(
                pilot,
                lambda: (
                    (run := app.view_state.current(feed)) is not None
                    and run.run != first.run
                    and run.count > 0
                ),
                "the re-attach",
            )
            # This one finishes and closes: "ended".
            await until(
                pilot, lambda: feed.state(app.view_state.current(feed)) == "ended", "ended", timeout=60
            )
            await until(pilot, lambda: "● ended" in screen_text(app), "ended on screen", timeout=5)
            assert table.row_count == N_LAYERS
            await pilot.press("q")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
