"""The terminal app (Textual lives here and only here). Start it with :func:`run_app`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from icsmon_agent.discovery import JobInfo


def theme_names() -> list[str]:
    """The names ``--theme`` accepts."""
    from textual.theme import BUILTIN_THEMES

    return sorted(BUILTIN_THEMES)


def run_app(
    connect: Callable[[], str | Sequence[str]],
    *,
    title: str = "",
    thresholds: Any = None,
    theme: str | None = None,
    bell: bool = False,
    jobs: Callable[[], list[JobInfo]] | None = None,
    connect_job: Callable[[list[JobInfo]], str | Sequence[str]] | None = None,
    compare: bool = False,
) -> int:
    """Run the terminal app until the person quits; return the exit status.

    ``connect()`` returns the ZeroMQ endpoints to subscribe to (one, or one per rank or run), or raises
    :class:`icsmon.targets.TargetError` while there is nothing to attach to (the app shows its
    waiting screen and calls again with backoff). It is called again whenever the job is lost or
    has ended, so it may re-resolve (find a restarted job, re-open an SSH forward).

    ``thresholds``: an :class:`icsmon.alerts.config.Thresholds` for the alert rules (None: defaults).
    ``theme``: a Textual theme name (see :func:`theme_names`). ``bell``: ring the terminal bell on
    each new critical alert. ``jobs``: when given and it lists more than one job at start, the app
    shows a picker; the chosen jobs' endpoints then come from ``connect_job(jobs)`` (default: their
    ``endpoint``), which is called again on every re-attach. ``compare``: open on the side-by-side
    screen (several runs given).
    """
    if theme is not None and theme not in theme_names():
        import sys

        print(f"icsmon: unknown theme {theme!r}; choose one of: {', '.join(theme_names())}", file=sys.stderr)
        return 2
    from icsmon.alerts.config import default_engine_factory
    from icsmon.feed import Feed
    from icsmon.tui.app import IcsmonApp

    feed = Feed(connect, engine_factory=default_engine_factory(thresholds))
    app = IcsmonApp(
        feed, title=title, theme=theme, bell=bell, jobs=jobs, connect_job=connect_job, compare=compare
    )
    app.run()
    return app.return_code or 0


def run_feed(feed: Any, *, title: str = "", theme: str | None = None) -> int:
    """Run the app on a feed that fills itself (a replay); return the exit status."""
    from icsmon.tui.app import IcsmonApp

    app = IcsmonApp(feed, title=title, theme=theme)
    app.run()
    return app.return_code or 0
