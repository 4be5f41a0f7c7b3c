"""Nets built only here, not tuned for: a BatchNorm CNN and a small transformer train normally under
`icsmon tail --json`, and no alert fires (the rules must not mistake ordinary training for sickness)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from helpers import icsmon, json_lines, start_script, wait_for_jobs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

HEAD = """
import sys, time
import torch
from torch import nn
import icsmon_agent

torch.manual_seed(0)
torch.set_num_threads(1)
"""

LOOP = """
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
mon = icsmon_agent.watch(model, every=1)
deadline = time.monotonic() + 20
while not mon.watching and time.monotonic() < deadline:
    time.sleep(0.02)
for step in range(int(sys.argv[1])):
    x, y = batch()
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
    mon.step(loss=loss)
mon.close()
"""

CNN = """
model = nn.Sequential(
    nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
    nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
    nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
)
proto = torch.randn(10, 3, 16, 16)
def batch():
    y = torch.randint(0, 10, (32,))
    return proto[y] + 0.5 * torch.randn(32, 3, 16, 16), y
"""

TRANSFORMER = """
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 50)
    def forward(self, x):
        return self.head(self.norm(self.encoder(self.embed(x)))).transpose(1, 2)
model = Tiny()
def batch():
    x = torch.randint(0, 50, (16, 12))
    return x, (x + 1) % 50  # next-token of a counting task
"""


@pytest.mark.parametrize(
    ("net", "body"), [("bn_cnn", CNN), ("transformer", TRANSFORMER)], ids=["bn_cnn", "transformer"]
)
def test_normal_training_raises_no_alert(net: str, body: str, tmp_path: Path, env: dict[str, str]) -> None:
    script = tmp_path / f"{net}.py"
    script.write_text(textwrap.dedent(HEAD + body + LOOP))
    proc = start_script(script, env, "120")
    try:
        (job,) = wait_for_jobs(env, 1)
        tail = icsmon("tail", str(job["pid"]), "--json", "--timeout", "90", env=env, timeout=100)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert tail.returncode == 0, tail.stderr
    lines = json_lines(tail.stdout)
    samples = [s for s in lines if s["type"] == "sample"]
    assert len(samples) >= 100  # the whole run was watched
    assert samples[-1]["loss"] < samples[0]["loss"]  # it did learn: a real training run
    assert [a for a in lines if a["type"] != "sample"] == []
