"""The jobs on a host reached over SSH, listed by a plain POSIX shell: the box needs no icsmon.

:data:`REMOTE_LIST_SCRIPT` reads the discovery files as :func:`icsmon_agent.discovery.read_jobs`
does (keep the two in step); :func:`parse_remote_listing` turns what it printed into jobs.
"""

from __future__ import annotations

import contextlib
import json

from icsmon_agent.discovery import JobInfo

# Prints each discovery file of a live job of this host between marker lines; the viewer runs it
# over SSH with `sh -s` (the script on stdin), so the remote login shell may be any shell and the
# box needs no icsmon on its PATH. Plain POSIX sh, sed and cat; printf rather than echo, whose
# handling of backslashes differs between shells. Like read_jobs(): files of this host whose pid is
# dead are deleted; files of other hosts (a home directory shared by a cluster) are skipped, since
# their sockets cannot be reached from here. `kill -0` fails with EPERM for another user's live pid,
# but the directory is private to one user.
REMOTE_LIST_SCRIPT = r"""
d="${ICSMON_RUNTIME_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/icsmon/runtime}"
here=$(uname -n)
printf 'ICSMON-DIR %s\n' "$d"
[ -d "$d" ] && [ ! -L "$d" ] && [ -O "$d" ] || { printf 'ICSMON-DONE\n'; exit 0; }
for f in "$d"/*.json; do
  [ -f "$f" ] && [ ! -L "$f" ] && [ -O "$f" ] || continue
  pid=$(sed -n 's/.*"pid": *\([0-9][0-9]*\).*/\1/p' "$f" | head -n 1)
  host=$(sed -n 's/.*"host": *"\([^"]*\)".*/\1/p' "$f" | head -n 1)
  [ -n "$pid" ] || continue
  [ "$host" = "$here" ] || continue
  if kill -0 "$pid" 2>/dev/null; then
    printf 'ICSMON-FILE %s\n' "$f"; cat "$f" 2>/dev/null; printf '\nICSMON-END\n'
  else
    sock=$(sed -n 's|.*"endpoint": *"ipc://\([^"]*\)".*|\1|p' "$f" | head -n 1)
    case "$sock" in "$d"/*|/tmp/icsmon-$(id -u)/*) rm -f "$sock" ;; esac
    rm -f "$f"
  fi
done
printf 'ICSMON-DONE\n'
"""


def parse_remote_listing(text: str) -> tuple[str, list[JobInfo]]:
    """Parse what :data:`REMOTE_LIST_SCRIPT` printed: (remote runtime dir, live jobs newest first).

    Lines outside the markers (a login banner, a chatty shell rc file) are ignored; a malformed file
    is skipped. Raises ``ValueError`` when the script did not run to its end (no ``sh`` there, or
    the output was cut), so a broken listing is not mistaken for "no jobs".
    """
    if "ICSMON-DIR " not in text or "ICSMON-DONE" not in text:
        raise ValueError("the remote listing did not complete")
    directory = ""
    jobs: list[JobInfo] = []
    current: list[str] | None = None
    path = ""
    for line in text.splitlines():
        line = line.rstrip("\r")
        if line.startswith("ICSMON-DIR "):
            directory = line[len("ICSMON-DIR ") :]
        elif line.startswith("ICSMON-FILE "):
            path = line[len("ICSMON-FILE ") :]
            current = []
        elif line == "ICSMON-END" and current is not None:
            with contextlib.suppress(ValueError):
                jobs.append(JobInfo.from_json(json.loads("\n".join(current)), path))
            current = None
        elif current is not None:
            current.append(line)
    jobs.sort(key=lambda j: j.started, reverse=True)
    return directory, jobs
