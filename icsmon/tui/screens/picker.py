"""Several jobs run on this machine: choose one."""

from __future__ import annotations

import time
from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from icsmon_agent.discovery import JobInfo


def job_label(job: JobInfo) -> str:
    age = max(0, int(time.time() - job.started))
    return f"{job.name:<20} pid {job.pid:<8} rank {job.rank}/{job.world_size}  {age:>6}s  {job.run}"


class PickerScreen(ModalScreen[JobInfo | None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss(None)", "Newest", tooltip="Take the most recent job")
    ]

    def __init__(self, jobs: list[JobInfo]) -> None:
        super().__init__()
        self.jobs = jobs

    def compose(self) -> ComposeResult:
        with Vertical(id="picker-box"):
            yield Static(f"{len(self.jobs)} jobs run on this machine: pick one (Enter)", id="picker-title")
            yield OptionList(*[Option(job_label(j), id=str(i)) for i, j in enumerate(self.jobs)], id="jobs")

    @on(OptionList.OptionSelected, "#jobs")
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.jobs[int(event.option_id or 0)])
