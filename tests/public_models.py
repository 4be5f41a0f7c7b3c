"""Small versions of public training code, written here (no downloads): the networks people train.

* :class:`GPT`: nanoGPT's model (pre-LayerNorm blocks, causal ``scaled_dot_product_attention``,
  GELU MLP, weight tying, dropout) and its optimizer set-up (AdamW, decay groups, warm-up + cosine).
* :func:`resnet18`: torchvision's ResNet-18 layout (BasicBlock, BatchNorm, in-place ReLU,
  ``zero_init_residual``), narrow and for small images so it trains on a CPU in seconds.
* :class:`RNNModel`: the PyTorch word-language-model example (embedding, dropout, LSTM/RNN, tied
  decoder), trained with its manual SGD loop.

Each comes with synthetic data it can learn. A script runs one as a job: ``python
tests/public_models.py --help``; the tests run it in subprocesses (bare, watched, compiled).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# ------------------------------------------------------------------ nanoGPT


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head, self.n_embd, self.dropout = n_head, n_embd, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(
        self,
        vocab: int = 32,
        block_size: int = 16,
        n_layer: int = 2,
        n_head: int = 2,
        n_embd: int = 32,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab, n_embd),
                wpe=nn.Embedding(block_size, n_embd),
                drop=nn.Dropout(dropout),
                h=nn.ModuleList([Block(n_embd, n_head, dropout) for _ in range(n_layer)]),
                ln_f=nn.LayerNorm(n_embd),
            )
        )
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        t = idx.size(1)
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay: float, lr: float) -> torch.optim.AdamW:
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        nodecay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": nodecay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def gpt_lr(
    it: int, lr: float = 3e-3, warmup: int = 10, decay_iters: int = 200, min_lr: float = 3e-4
) -> float:
    """nanoGPT's get_lr: linear warm-up, then cosine decay to ``min_lr``."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay_iters:
        return min_lr
    ratio = (it - warmup) / (decay_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def copy_task(
    gen: torch.Generator, batch: int = 8, block: int = 16, vocab: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences that repeat their first half: the second half is learnable from the first."""
    half = torch.randint(0, vocab, (batch, block // 2 + 1), generator=gen)
    seq = torch.cat([half, half], dim=1)[:, : block + 1]
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


# ------------------------------------------------------------------ torchvision ResNet-18


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(
        self, layers: list[int], num_classes: int = 4, width: int = 8, zero_init_residual: bool = True
    ) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)  # CIFAR-style stem: small images
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(**kwargs: Any) -> ResNet:
    return ResNet([2, 2, 2, 2], **kwargs)


def quadrant_task(gen: torch.Generator, batch: int = 16, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images with one bright quadrant; the class is which one."""
    x = torch.randn(batch, 3, size, size, generator=gen) * 0.5
    y = torch.randint(0, 4, (batch,), generator=gen)
    h = size // 2
    for i, c in enumerate(y.tolist()):
        r, col = divmod(c, 2)
        x[i, :, r * h : (r + 1) * h, col * h : (col + 1) * h] += 1.5
    return x, y


# ------------------------------------------------------------------ word_language_model


class RNNModel(nn.Module):
    """The PyTorch example's RNNModel: encoder, recurrent module, decoder (tied if asked)."""

    def __init__(
        self,
        rnn_type: str,
        ntoken: int,
        ninp: int,
        nhid: int,
        nlayers: int,
        dropout: float = 0.2,
        tie: bool = True,
    ) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        if rnn_type == "LSTM":
            self.rnn: nn.Module = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        else:
            self.rnn = nn.RNN(ninp, nhid, nlayers, nonlinearity="relu", dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        if tie:
            self.decoder.weight = self.encoder.weight
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        self.rnn_type, self.nhid, self.nlayers = rnn_type, nhid, nlayers

    def forward(self, x: torch.Tensor, hidden: Any) -> tuple[torch.Tensor, Any]:
        emb = self.drop(self.encoder(x))
        output, hidden = self.rnn(emb, hidden)
        decoded = self.decoder(self.drop(output)).view(-1, self.decoder.out_features)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz: int) -> Any:
        weight = next(self.parameters())
        if self.rnn_type == "LSTM":
            return (
                weight.new_zeros(self.nlayers, bsz, self.nhid),
                weight.new_zeros(self.nlayers, bsz, self.nhid),
            )
        return weight.new_zeros(self.nlayers, bsz, self.nhid)


def repackage_hidden(h: Any) -> Any:
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)


def counting_corpus(
    gen: torch.Generator, bptt: int = 12, bsz: int = 8, ntoken: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each column counts up from a random start (mod ntoken): the next word is learnable."""
    start = torch.randint(0, ntoken, (1, bsz), generator=gen)
    seq = (start + torch.arange(bptt + 1).unsqueeze(1)) % ntoken
    return seq[:-1], seq[1:].reshape(-1)


# ------------------------------------------------------------------ a job, as a script runs it

MLP_LAYERS = 8


def mlp() -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(MLP_LAYERS):
        layers += [nn.Linear(32, 32), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(32, 4))


class Job:
    """One training run of a public-style script; ``watch`` adds the two lines."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.losses: list[float] = []
        self.monitor: Any = None
        self.samples = 0
        self.layers: list[str] = []
        self.notes: dict[str, Any] = {}

    def watch(self, model: nn.Module) -> None:
        if self.args.watch:
            import icsmon_agent

            self.monitor = icsmon_agent.watch(model, every=self.args.every, endpoint="tcp")
            if self.args.viewer:
                self._subscribe()

    def compile_and_watch(self, model: nn.Module) -> nn.Module:
        """``torch.compile`` if asked, with ``watch()`` before or after it; what to call."""
        if self.args.watch_before_compile:
            self.watch(model)
        train = torch.compile(model) if self.args.compile else model
        if not self.args.watch_before_compile:
            self.watch(train)
        return train

    def _subscribe(self) -> None:
        from icsmon.store import Store
        from icsmon.subscriber import Subscriber
        from icsmon_agent.protocol import Sample, Schema

        self._sub = Subscriber(self.monitor.endpoint)
        self._sub.__enter__()
        self._store = Store()
        self._kinds = (Sample, Schema)
        deadline = __import__("time").monotonic() + 10
        while not self.monitor.watching and __import__("time").monotonic() < deadline:
            self._sub.poll(0.05)

    def poll(self, wait: float = 0.0) -> None:
        if not getattr(self, "_sub", None):
            return
        Sample, Schema = self._kinds
        for msg in self._sub.poll(wait):
            if isinstance(msg, Sample):
                self.samples += 1
                self.notes.setdefault("sampled_steps", []).append(msg.step)
                self.notes.setdefault("scalars", {}).update({k: v for k, v in msg.scalars.items()})
            elif isinstance(msg, Schema):
                self.layers = [layer.name for layer in msg.layers]

    def finish(self) -> dict[str, Any]:
        if self.monitor is not None:
            self.monitor.close()
            for _ in range(40):
                self.poll(0.05)
            if getattr(self, "_sub", None):
                self._sub.__exit__(None, None, None)
        return {
            "losses": [float(v).hex() for v in self.losses],
            "samples": self.samples,
            "layers": self.layers,
            "errors": self.monitor.errors if self.monitor is not None else 0,
            "skipped": self.monitor.skipped if self.monitor is not None else 0,
            "dropped": self.monitor.dropped if self.monitor is not None else 0,
            "compiled": bool(self.monitor.compiled) if self.monitor is not None else False,
            **self.notes,
        }


def run_gpt(job: Job) -> None:
    a = job.args
    torch.manual_seed(0)
    model = GPT(dropout=a.dropout)
    train = job.compile_and_watch(model)
    opt = model.configure_optimizers(weight_decay=0.1, lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if a.amp else torch.autocast("cpu", enabled=False)
    for it in range(a.steps):
        for group in opt.param_groups:
            group["lr"] = gpt_lr(it)
        for _ in range(a.accum):
            x, y = copy_task(gen)
            with autocast:
                _, loss = train(x, y)
                loss = loss / a.accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        job.losses.append(loss.item())
        if a.eval_every and it % a.eval_every == 0:
            with torch.no_grad():  # nanoGPT's estimate_loss, without model.eval(): still not training
                x, y = copy_task(gen)
                _, val = train(x * 0 + 3, y)
                job.losses.append(val.item())
        job.poll()


def run_resnet(job: Job) -> None:
    a = job.args
    torch.manual_seed(0)
    model = resnet18()
    train = job.compile_and_watch(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    ema = None
    if a.ema:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9)
        )
    gen = torch.Generator().manual_seed(1)
    for it in range(a.steps):
        x, y = quadrant_task(gen)
        loss = F.cross_entropy(train(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update_parameters(model)
        job.losses.append(loss.item())
        if a.eval_every and it % a.eval_every == 0:
            model.eval()
            with torch.no_grad():
                x, y = quadrant_task(gen)
                job.losses.append(F.cross_entropy(train(x), y).item())
                if ema is not None:
                    job.losses.append(F.cross_entropy(ema(x), y).item())
            model.train()
        if a.checkpoint and it == a.steps // 2:
            buf = io.BytesIO()
            torch.save({"model": model, "state": model.state_dict(), "opt": opt.state_dict()}, buf)
            job.notes["checkpoint_bytes"] = len(buf.getvalue())
            job.notes["checkpoint_mentions_icsmon"] = b"icsmon" in buf.getvalue()
            copy.deepcopy(model)
            if a.checkpoint_path:
                Path(a.checkpoint_path).write_bytes(buf.getvalue())
        job.poll()


def run_lstm(job: Job) -> None:
    """The word-language-model example's train(): manual SGD, clipping, repackaged hidden state."""
    a = job.args
    torch.manual_seed(0)
    model = RNNModel(a.rnn, 32, 32, 32, 2, dropout=a.dropout)
    job.watch(model)
    criterion = nn.NLLLoss()
    gen = torch.Generator().manual_seed(1)
    hidden = model.init_hidden(8)
    lr = a.lr
    for it in range(a.steps):
        model.train()
        data, targets = counting_corpus(gen)
        model.zero_grad()
        hidden = repackage_hidden(hidden)
        output, hidden = model(data, hidden)
        loss = criterion(output, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)
        job.losses.append(loss.item())
        if a.eval_every and it % a.eval_every == 0:
            with torch.no_grad():  # evaluate() without model.eval(): a no_grad pass is not training
                data, targets = counting_corpus(gen)
                out, _ = model(data, model.init_hidden(8))
                job.losses.append(criterion(out, targets).item())
        job.poll()


def run_mlp(job: Job) -> None:
    a = job.args
    torch.manual_seed(0)
    model = mlp()
    train = job.compile_and_watch(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(a.steps):
        x = torch.randn(16, 32, generator=gen)
        loss = F.mse_loss(train(x), x[:, :4])
        opt.zero_grad()
        loss.backward()
        opt.step()
        job.losses.append(loss.item())
        job.poll()


RUNS: dict[str, Callable[[Job], None]] = {
    "gpt": run_gpt,
    "resnet": run_resnet,
    "lstm": run_lstm,
    "mlp": run_mlp,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train a small public-style model; print JSON of its losses.")
    p.add_argument("model", choices=sorted(RUNS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--watch", action="store_true", help="add the two lines")
    p.add_argument("--viewer", action="store_true", help="subscribe in-process, count the samples")
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--watch-before-compile", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--ema", action="store_true")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--checkpoint", action="store_true")
    p.add_argument("--checkpoint-path", default="")
    p.add_argument("--rnn", default="LSTM")
    p.add_argument("--lr", type=float, default=5.0)
    p.add_argument("--clip", type=float, default=0.25)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("default")
    job = Job(args)
    RUNS[args.model](job)
    print(json.dumps(job.finish()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
