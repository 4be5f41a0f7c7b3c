"""Several jobs run on this machine: choose one, or mark several to watch side by side.

The list is read again every second: ages tick, new jobs appear, and a job that ended stays in the
list marked as ended (it cannot be picked: there is nothing left to subscribe to).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Footer, OptionList, Static
from textual.widgets.option_list import Option

from icsmon.render import age
from icsmon.targets import group_ranks
from icsmon.tui.safe import literal
from icsmon_agent.discovery import JobInfo

REFRESH_S = 1.0


def job_label(ranks: list[JobInfo], *, marked: bool = False, ended: bool = False) -> Text:
    """One line of the picker: a job with its ranks."""
    job = ranks[0]
    pids = ",".join(str(j.pid) for j in ranks[:4]) + ("…" if len(ranks) > 4 else "")
    rank_text = f"{len(ranks)}/{job.world_size} ranks" if job.world_size > 1 else "1 rank"
    line = Text("[x] " if marked else "[ ] ", style="bold" if marked else "dim")
    line.append(
        literal(f"{job.name[:20]:<20} pid {pids:<12} {rank_text:<10} {age(job.started):>6}  {job.run}")
    )
    if ended:
        line.append("  ended", style="bold blue")
        line.stylize("dim", 0, len(line) - len("  ended"))
    return line


class PickerScreen(ModalScreen[list[JobInfo] | None]):
    """Returns every rank of the chosen jobs, or None (Escape: back to what was on screen)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "choose", "Watch", tooltip="Watch the marked jobs (or the highlighted one)"),
        Binding("space", "mark", "Mark", tooltip="Mark a job to watch several side by side"),
        Binding("escape", "back", "Back", tooltip="Back to the screen before"),
        Binding("q", "app.quit", "Quit", tooltip="Quit icsmon (the jobs keep running)"),
        Binding("ctrl+c", "app.quit", "Quit", show=False),
    ]

    def __init__(self, jobs: Callable[[], list[JobInfo]], *, where: str = "on this machine") -> None:
        super().__init__()
        self.list_jobs = jobs
        self.where = where
        self.groups: list[list[JobInfo]] = group_ranks(jobs())
        self.ended: set[str] = set()  # run ids listed before that are gone now
        self.marked: set[str] = set()

    def compose(self) -> ComposeResult:
        with Vertical(id="picker-box"):
            yield Static(id="picker-title")
            yield OptionList(id="jobs")
        yield Footer()

    def on_mount(self) -> None:
        self._draw()
        self.query_one(OptionList).focus()
        self.set_interval(REFRESH_S, self.refresh_jobs)

    def refresh_jobs(self) -> None:
        """List the jobs again: new ones join, the ones gone are kept and marked as ended."""
        try:
            fresh = group_ranks(self.list_jobs())
        except Exception:  # a listing over SSH can fail for a moment: keep what is shown
            fresh = [g for g in self.groups if g[0].run not in self.ended]
        live = {g[0].run for g in fresh}
        kept = [g for g in self.groups if g[0].run not in live]
        self.ended |= {g[0].run for g in kept}
        self.marked -= self.ended
        self.groups = fresh + kept
        self._draw()

    def _draw(self) -> None:
        live = len([g for g in self.groups if g[0].run not in self.ended])
        title = f"{live} jobs run {self.where}: Enter watches one, space marks several to watch side by side"
        self.query_one("#picker-title", Static).update(title)
        options = self.query_one(OptionList)
        ids = [g[0].run for g in self.groups]
        labels = [
            job_label(g, marked=g[0].run in self.marked, ended=g[0].run in self.ended) for g in self.groups
        ]
        shown = [options.get_option_at_index(i).id for i in range(options.option_count)]
        if shown == ids:  # the same jobs: new ages and marks in place, the highlight stays put
            for i, (run, label) in enumerate(zip(ids, labels, strict=True)):
                options.replace_option_prompt_at_index(i, label)
                if run in self.ended:
                    options.disable_option(run)
        else:
            was = shown[options.highlighted] if options.highlighted is not None and shown else None
            options.clear_options()
            options.add_options(
                Option(label, id=run, disabled=run in self.ended)
                for run, label in zip(ids, labels, strict=True)
            )
            options.highlighted = ids.index(was) if was in ids else 0
        if options.highlighted is None and ids:
            options.highlighted = 0

    def _highlighted(self) -> list[JobInfo] | None:
        options = self.query_one(OptionList)
        if options.highlighted is None or not self.groups:
            return None
        return self.groups[options.highlighted]

    def action_mark(self) -> None:
        group = self._highlighted()
        if group is None or group[0].run in self.ended:
            return
        self.marked ^= {group[0].run}
        self._draw()

    def action_choose(self) -> None:
        chosen = [j for g in self.groups if g[0].run in self.marked for j in g]
        if not chosen:
            group = self._highlighted()
            if group is None:
                return
            if group[0].run in self.ended:
                self.notify(
                    f"{group[0].name} has ended: nothing left to watch", severity="warning", markup=False
                )
                return
            chosen = group
        self.dismiss(chosen)

    @on(OptionList.OptionSelected, "#jobs")
    def _selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.action_choose()

    def action_back(self) -> None:
        self.dismiss(None)
