"""Names are data: a layer, type or job name is shown as it is, never as markup or a control code.

``nn.Module.add_module`` accepts any string, so a name may hold ``[b]`` (Rich markup), ``[/]``
(which makes Textual raise) or an escape sequence (which a terminal would obey).
"""

from __future__ import annotations

import re

from rich.text import Text

#: C0 and C1 control characters and DEL; tab and newline too, since a name is one line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def clean(name: str) -> str:
    """``name`` with every control character shown as a visible escape (``\\x1b``), nothing obeyed."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", name)


def literal(text: str, style: str = "") -> Text:
    """A Rich Text of ``text`` taken literally (no markup), control characters made visible."""
    return Text(clean(text), style=style)
