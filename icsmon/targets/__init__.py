"""What did the user name? Local jobs (a PID, a run id or name, nothing: the job here), endpoints,
SSH hosts, and what each becomes: the endpoints to subscribe to.

* :mod:`.local`: this machine's jobs (discovery files) and typed endpoints;
* :mod:`.ssh`: one OpenSSH master connection per host, its forwards and remote commands;
* :mod:`.remote`: a job on an SSH host, listed and forwarded through that connection;
* :mod:`.listing`: the one-shot script that lists a host's jobs, and its parser;
* :mod:`.session`: the life of a command's SSH targets (signals, a watchdog, teardown).

Nothing here prints or imports a command; failures are :class:`~icsmon.errors.TargetError`.
"""

from __future__ import annotations

from icsmon.errors import TargetError
from icsmon.targets.local import (
    Resolved,
    as_endpoint,
    check_socket,
    describe,
    group_ranks,
    is_endpoint,
    is_local_run,
    is_ssh_host,
    live_endpoints,
    pick_job,
    resolve_local,
    resolve_targets,
    ssh_host_of,
    typed_targets,
)

__all__ = [
    "Resolved",
    "TargetError",
    "as_endpoint",
    "check_socket",
    "describe",
    "group_ranks",
    "is_endpoint",
    "is_local_run",
    "is_ssh_host",
    "live_endpoints",
    "pick_job",
    "resolve_local",
    "resolve_targets",
    "ssh_host_of",
    "typed_targets",
]
