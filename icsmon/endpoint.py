"""An endpoint to subscribe to, carrying the key of the job behind it.

A job beyond loopback speaks CURVE, and a viewer needs the job's public key for each such
endpoint. The key comes from where the endpoint was found (the job's discovery file, an SSH host's
listing, ``--key``) and travels with it to the socket that connects: no registry on the side.
"""

from __future__ import annotations


class Endpoint(str):
    """A ZeroMQ endpoint (``ipc://PATH``, ``tcp://HOST:PORT``) and the CURVE public key (Z85) of
    the job publishing there, "" when it speaks plain. A ``str``: shown, compared and joined as
    its address."""

    key: str

    def __new__(cls, address: str, key: str = "") -> Endpoint:
        endpoint = super().__new__(cls, address)
        endpoint.key = key
        return endpoint


def key_of(endpoint: str) -> str:
    """The CURVE key an endpoint carries ("" for a plain one, or a plain string)."""
    return endpoint.key if isinstance(endpoint, Endpoint) else ""
