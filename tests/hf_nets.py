"""Small versions of the Hugging Face architectures large models are trained with, built from their
configs (no download): Llama (RMSNorm, SwiGLU, rotary), Mixtral (top-2 routed experts), T5 (ReLU
feed-forward, relative position bias), ViT (pre-LN), ConvNeXt (layer scale). Each comes with a
training step on a learnable synthetic task; ``step(i)`` returns the step's loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from public_models import quadrant_task

Step = Callable[[int], float]
Run = Callable[[], tuple[nn.Module, Step]]
VOCAB = 64


def _transformers() -> Any:
    import pytest

    return pytest.importorskip("transformers", reason="transformers is not installed")


def counting(gen: torch.Generator, batch: int = 8, block: int = 16) -> torch.Tensor:
    """Rows that count up from a random start (mod VOCAB): every next token is learnable."""
    start = torch.randint(0, VOCAB, (batch, 1), generator=gen)
    return (start + torch.arange(block)) % VOCAB


def _train(
    model: nn.Module,
    loss_of: Callable[[torch.Generator], torch.Tensor],
    *,
    lr: float,
    warmup: int = 20,
    clip: float | None = 1.0,
) -> Step:
    """AdamW with weight decay, a linear warm-up, clipping: the recipe these models train with."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)

    def step(i: int) -> float:
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (i + 1) / warmup) if warmup else lr
        loss = loss_of(gen)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def llama(
    *, lr: float = 3e-3, warmup: int = 20, clip: float | None = 1.0, init_std: float | None = None
) -> Run:
    """Llama (RMSNorm, SwiGLU, rotary, grouped-query attention); ``init_std`` re-draws every matrix
    from N(0, init_std^2), as a script that forgets the model's own init does."""

    def make() -> tuple[nn.Module, Step]:
        transformers = _transformers()
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            tie_word_embeddings=False,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
        if init_std is not None:
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() >= 2:
                        p.normal_(0.0, init_std)

        def loss_of(gen: torch.Generator) -> torch.Tensor:
            x = counting(gen)
            return model(input_ids=x, labels=x).loss

        return model, _train(model, loss_of, lr=lr, warmup=warmup, clip=clip)

    return make


def mixtral(top_k: int = 2) -> Run:
    """Mixtral: every feed-forward a top-k mixture of 4 experts, whose weights are fused. Under
    top-1 routing the router gets no gradient by design (its one weight renormalises to 1)."""

    def make() -> tuple[nn.Module, Step]:
        transformers = _transformers()
        torch.manual_seed(0)
        config = transformers.MixtralConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=top_k,
            max_position_embeddings=64, tie_word_embeddings=False,
        )  # fmt: skip
        model = transformers.MixtralForCausalLM(config)

        def loss_of(gen: torch.Generator) -> torch.Tensor:
            x = counting(gen)
            return model(input_ids=x, labels=x).loss

        return model, _train(model, loss_of, lr=3e-3)

    return make


def t5() -> tuple[nn.Module, Step]:
    """T5 (ReLU feed-forward, relative position bias): map each counting row to the next one."""
    transformers = _transformers()
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=4, feed_forward_proj="relu", dropout_rate=0.0, decoder_start_token_id=0,
    )  # fmt: skip
    model = transformers.T5ForConditionalGeneration(config)

    def loss_of(gen: torch.Generator) -> torch.Tensor:
        x = counting(gen, block=8)
        return model(input_ids=x, labels=(x + 1) % VOCAB).loss

    return model, _train(model, loss_of, lr=3e-3)


def vit() -> tuple[nn.Module, Step]:
    """ViT (pre-LayerNorm) on 16x16 images: which quadrant is bright."""
    transformers = _transformers()
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, num_labels=4,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return _classify(transformers.ViTForImageClassification(config), lr=1e-3)


def convnext() -> tuple[nn.Module, Step]:
    """ConvNeXt with layer scale: each block's output times a learned gamma that no leaf holds."""
    transformers = _transformers()
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(
        num_channels=3, patch_size=2, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=4,
        layer_scale_init_value=1e-6, drop_path_rate=0.0, image_size=16,
    )  # fmt: skip
    return _classify(transformers.ConvNextForImageClassification(config), lr=2e-3)


def _classify(model: nn.Module, lr: float) -> tuple[nn.Module, Step]:
    """An image classifier trained on the quadrant task."""

    def loss_of(gen: torch.Generator) -> torch.Tensor:
        x, y = quadrant_task(gen)
        return F.cross_entropy(model(pixel_values=x).logits, y)

    return model, _train(model, loss_of, lr=lr)
