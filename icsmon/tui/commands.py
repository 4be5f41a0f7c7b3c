"""Command palette: "jump to layer" for every layer of the run on screen."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from textual.command import DiscoveryHit, Hit, Hits, Provider

if TYPE_CHECKING:
    from icsmon.tui.app import IcsmonApp

DISCOVER_MAX = 30  # the empty palette lists the first layers; typing searches all of them


class LayerCommands(Provider):
    def _names(self) -> list[str]:
        app: IcsmonApp = self.app  # type: ignore[assignment]
        run = app.feed.current()
        return run.layer_names if run is not None else []

    def _jump(self, layer: int) -> None:
        app: IcsmonApp = self.app  # type: ignore[assignment]
        app.jump_to_layer(layer)

    async def discover(self) -> Hits:
        for i, name in enumerate(self._names()[:DISCOVER_MAX]):
            yield DiscoveryHit(f"jump to layer {name}", partial(self._jump, i), help=f"layer {i}")

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for i, name in enumerate(self._names()):
            command = f"jump to layer {name}"
            score = matcher.match(command)
            if score > 0:
                yield Hit(score, matcher.highlight(command), partial(self._jump, i), help=f"layer {i}")
