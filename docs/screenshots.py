"""Regenerate the README's screenshots of ``icsmon attach`` on the built-in demo.

    .venv/bin/python docs/screenshots.py

Starts the demo's vanishing-gradient job (50-layer ReLU MLP, weights N(0, 0.01²)), runs the real
terminal app on it headless, and saves SVGs of the main screen, a layer's detail and the heatmap
next to this file. The job and the app are the real ones: only the terminal is virtual.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from icsmon.alerts.config import default_engine_factory
from icsmon.feed import Feed
from icsmon.targets import resolve_local
from icsmon.tui.app import IcsmonApp

HERE = Path(__file__).parent
SIZE = (120, 36)
SAMPLES = 120  # enough history for the sparklines and the heatmap to fill in


async def shoot() -> None:
    feed = Feed(lambda: resolve_local(None).endpoints, engine_factory=default_engine_factory())
    app = IcsmonApp(feed, title="icsmon demo vanishing")
    async with app.run_test(size=SIZE) as pilot:
        deadline = time.monotonic() + 120
        while (run := app.view_state.current(feed)) is None or run.count < SAMPLES:
            if time.monotonic() > deadline:
                raise SystemExit("the demo job sent too few samples in 120 s")
            await pilot.pause(0.2)
        await pilot.pause(0.5)
        app.save_screenshot("attach-main.svg", str(HERE))
        app.jump_to_layer(30)  # deep in the net, where the std has vanished
        await pilot.press("enter")
        await pilot.pause(0.5)
        app.save_screenshot("attach-detail.svg", str(HERE))
        await pilot.press("escape", "h")
        await pilot.pause(0.5)
        app.save_screenshot("attach-heatmap.svg", str(HERE))
        await pilot.press("escape", "q")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="icsmon-shots-") as runtime:
        os.environ["ICSMON_RUNTIME_DIR"] = runtime
        job = subprocess.Popen(
            [sys.executable, "-m", "icsmon.demo.train", "vanishing", "--steps", "100000", "--delay", "0.02"],
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        try:
            asyncio.run(shoot())
        finally:
            job.kill()
            job.wait()
    print(f"wrote {', '.join(p.name for p in sorted(HERE.glob('attach-*.svg')))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
