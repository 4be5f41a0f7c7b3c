"""Fixed synthetic runs for the app's tests and snapshots, sent through the real wire encoding.

Every message is encoded and decoded with the real protocol before the feed sees it, so a snapshot
shows exactly what a live job with these figures would show. Nothing depends on the clock or on
randomness: the same call draws the same screen.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from icsmon.feed import Feed
from icsmon.targets import TargetError
from icsmon.wire import decode
from icsmon_agent.protocol import (
    STAT_INDEX,
    STATS,
    Event,
    LayerInfo,
    Message,
    Sample,
    Schema,
    encode,
    schema_id_for,
)

T0 = 1_700_000_000.0


def no_job() -> str:
    raise TargetError("no icsmon job is running on this machine")


def layer_table(n_layers: int) -> tuple[LayerInfo, ...]:
    """Linear / ReLU pairs, the seed's deep MLP, with a Tanh every tenth block for saturation."""
    out = []
    for i in range(n_layers):
        block, part = divmod(i, 2)
        if part == 0:
            out.append(LayerInfo(f"net.{block}.fc", "Linear", (128, 256), "linear"))
        elif block % 10 == 9:
            out.append(LayerInfo(f"net.{block}.act", "Tanh", (128, 256), "tanh"))
        else:
            out.append(LayerInfo(f"net.{block}.act", "ReLU", (128, 256), "relu"))
    return tuple(out)


def figures(n_layers: int, k: int, *, decay: float, nan_from: int | None = None) -> npt.NDArray[np.float32]:
    """One sample's figures: std shrinks by ``decay`` per layer (vanishing when < 1) and wobbles."""
    fig = np.full((n_layers, len(STATS)), np.nan, dtype=np.float32)
    for i in range(n_layers):
        std = decay**i * (1.0 + 0.15 * math.sin(0.4 * k + 0.3 * i))
        relu = i % 2 == 1
        fig[i, STAT_INDEX["mean"]] = std * (0.4 if relu else 0.01 * math.cos(k + i))
        fig[i, STAT_INDEX["std"]] = std
        fig[i, STAT_INDEX["min"]] = 0.0 if relu else -3 * std
        fig[i, STAT_INDEX["max"]] = 3 * std
        fig[i, STAT_INDEX["zero_frac"]] = 0.5 if relu else 0.0
        fig[i, STAT_INDEX["dead_frac"]] = (0.02 * (i % 7)) if relu else 0.0
        fig[i, STAT_INDEX["nonfinite"]] = 0
        fig[i, STAT_INDEX["shift"]] = 1e-3 * (1 + (k * 7 + i * 3) % 5)
        fig[i, STAT_INDEX["grad_norm"]] = 0.0 if relu else std * 0.1 + 1e-6
    if nan_from is not None:
        fig[nan_from:, STAT_INDEX["std"]] = np.inf
        fig[nan_from:, STAT_INDEX["mean"]] = np.nan
        fig[nan_from:, STAT_INDEX["nonfinite"]] = 128 * 256
    return fig


def messages(
    n_layers: int = 40,
    n_samples: int = 80,
    *,
    decay: float = 0.7,
    run: str = "vanishing-1a2b3c",
    name: str = "vanishing",
    nan_from: int | None = None,
    closing: bool = False,
) -> list[Message]:
    layers = layer_table(n_layers)
    schema = Schema(
        run=run,
        rank=0,
        seq=1,
        t=T0,
        layers=layers,
        name=name,
        host="gpu-box",
        pid=4242,
        world_size=1,
        every=10,
        started=T0,
        schema_id=schema_id_for(layers),
    )
    out: list[Message] = [schema]
    for k in range(n_samples):
        bad = nan_from if nan_from is not None and k == n_samples - 1 else None
        out.append(
            Sample(
                run=run,
                rank=0,
                seq=2 + k,
                t=T0 + k * 0.5,
                step=10 * k,
                schema_id=schema.schema_id,
                figures=figures(n_layers, k, decay=decay, nan_from=bad),
                loss=2.0 / (1 + 0.05 * k),
            )
        )
    if closing:
        out.append(Event(run=run, rank=0, seq=2 + n_samples, t=T0 + n_samples, event="closing"))
    return out


def filled_feed(msgs: list[Message] | None = None, engine: bool = True) -> Feed:
    """A feed that never connects, holding ``msgs`` as a subscriber would have decoded them."""
    from icsmon.alerts.config import default_engine_factory

    feed = Feed(no_job, engine_factory=default_engine_factory() if engine else None)
    for msg in msgs if msgs is not None else messages():
        feed.ingest(decode(encode(msg)))
    return feed
