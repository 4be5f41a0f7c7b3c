"""The run header: who the job is, how fast it goes, and whether the connection is alive."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from icsmon.feed import Feed
from icsmon.render import clean, fmt
from icsmon.store import RunState
from icsmon.tui import view

STATE_STYLE = {
    "waiting": "bold yellow",
    "live": "bold green",
    "paused": "bold yellow",
    "stale": "bold yellow",
    "ended": "bold blue",
    "lost": "bold white on red",
}


def header_text(
    feed: Feed, run: RunState | None, *, paused: bool = False, extra: str = "", label: str = "icsmon"
) -> Text:
    state = feed.state(run)
    text = Text(no_wrap=False)
    text.append(f" {label} ", style="bold reverse")
    if run is None or run.schema is None:
        text.append(f"  {state.upper()}", style=STATE_STYLE[state])
        if feed.endpoint:
            text.append(f"  {feed.endpoint}", style="dim")
        if feed.banner:
            text.append(f"  {feed.banner}", style="bold reverse cyan")
        return text
    s = run.schema
    text.append(f" {clean(s.name or run.run)}", style="bold")
    text.append(f"  {clean(s.host or '?')}  pid {s.pid}  rank {run.rank}/{s.world_size}")
    step = run.latest_step
    text.append(f"  step {step if step is not None else '-'}", style="bold")
    text.append(f"  {view.steps_rate(run)} steps/s")
    loss = run.latest_loss
    if loss is not None:
        text.append(f"  loss {fmt(loss, 4)}")
    scale = run.scalars.get("loss_scale")
    if scale is not None:  # fp16 with a loss scaler: its gradient norms are shown unscaled
        text.append(f"  scale {fmt(scale, 3)}", style="dim")
        if run.scalars.get("scaler_skipped") == 1:
            text.append("  step skipped by the scaler", style="yellow")
    text.append("  ")
    text.append(f"● {state}", style=STATE_STYLE[state])
    dropped = run.dropped + run.agent_dropped
    text.append(f"  dropped {dropped}", style="bold red" if dropped else "dim")
    if feed.rejected:
        text.append(f"  rejected {feed.rejected}", style="bold red")
    if run.forward_steps:
        text.append("  steps = forwards", style="yellow")  # no optimizer step or mon.step() seen
    if feed.banner:
        text.append(f"  {feed.banner}", style="bold reverse cyan")
    if paused:
        text.append("  PAUSED", style="bold reverse yellow")
    if extra:
        text.append(f"  {extra}", style="dim")
    return text


class RunHeader(Static):
    DEFAULT_CSS = """
    RunHeader { height: auto; max-height: 3; background: $panel; }
    """
