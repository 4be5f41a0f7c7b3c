"""Names are data: a layer, type or job name is shown as it is, never as markup or a control code.

``nn.Module.add_module`` accepts any string, so a name may hold ``[b]`` (Rich markup), ``[/]``
(which makes Textual raise) or an escape sequence (which a terminal would obey).
"""

from __future__ import annotations

from rich.text import Text

from icsmon.render import clean


def literal(text: str, style: str = "") -> Text:
    """A Rich Text of ``text`` taken literally (no markup), control characters made visible."""
    return Text(clean(text), style=style)


__all__ = ["clean", "literal"]
