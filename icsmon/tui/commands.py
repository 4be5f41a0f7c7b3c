"""Command palette: "jump to layer" for every layer of the run on screen."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.content import Content

from icsmon.tui.safe import clean, literal

if TYPE_CHECKING:
    from icsmon.tui.app import IcsmonApp

DISCOVER_MAX = 30  # the empty palette lists the first layers; typing searches all of them


class LayerCommands(Provider):
    def _names(self) -> list[str]:
        app: IcsmonApp = self.app  # type: ignore[assignment]
        run = app.view_state.current(app.feed)
        return run.layer_names if run is not None else []

    def _jump(self, layer: int) -> None:
        app: IcsmonApp = self.app  # type: ignore[assignment]
        app.jump_to_layer(layer)

    async def discover(self) -> Hits:
        for i, name in enumerate(self._names()[:DISCOVER_MAX]):
            yield DiscoveryHit(literal(f"jump to layer {name}"), partial(self._jump, i), help=f"layer {i}")

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for i, name in enumerate(self._names()):
            command = clean(f"jump to layer {name}")  # a name is text: never markup, never a control code
            score = matcher.match(command)
            if score > 0:
                # highlight() reads its text as markup: a name with brackets is shown plain instead.
                display = matcher.highlight(command) if "[" not in command else Content(command)
                yield Hit(score, display, partial(self._jump, i), help=f"layer {i}")
