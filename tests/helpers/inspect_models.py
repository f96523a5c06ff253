"""What the ``entrotrain inspect`` tests inspect, built in code (no download): a character tokenizer, tiny random HF
models saved as ``Trainer`` saves them, Lightning checkpoints rewritten on disk, and the float64 brute force of a
TinyGPT checkpoint's per-head attention entropy on its datamodule's first validation batches."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tests.helpers.brute import causal_head_means


# ---------------------------------------------------------------------------------------------------- HF
def char_tokenizer(text: str) -> Any:
    """A ``PreTrainedTokenizerFast`` with one token per character of ``text`` (``[UNK]`` = 0), built in code."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["[UNK]", *sorted(set(text))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def tiny_gpt2(vocab: int, positions: int = 32, seed: int = 0) -> torch.nn.Module:
    """A 2-layer, width-16, 2-head random ``GPT2LMHeadModel`` without dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def perturb(model: torch.nn.Module, scale: float, seed: int) -> None:
    """Add ``scale`` × N(0, 1) noise to every parameter (a later checkpoint)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------------------------------------------- Lightning
def rewrite_checkpoint(src: Path, dst: Path, **changes: Any) -> Path:
    """Copy the Lightning checkpoint ``src`` to ``dst`` with top-level entries replaced (``hyper_parameters=...``)."""
    checkpoint = torch.load(src, map_location="cpu", weights_only=True)
    checkpoint.update(changes)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, dst)
    return dst


class OpensAFile:
    """Pickles to ``open(path, "w")``: loading it with full unpickling creates ``path`` (code a checkpoint runs)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (self.path, "w")


def tinygpt_brute(path: Path, batches: int) -> tuple[dict[str, float], float]:
    """Per-head ``entropy/attn/L{l}/H{h}`` and ``entropy/attn_norm/L{l}/H{h}`` of the TinyGPT checkpoint ``path``
    on its datamodule's first ``batches`` validation batches (q, k captured at each attention's ``qkv`` linear,
    float64 brute force over the concatenated batches), and the mean validation cross-entropy."""
    from entrotrain import tasks

    assert tasks.LanguageModelingTask  # Lightning builds only classes already imported
    from lightning.pytorch import LightningDataModule, LightningModule

    module = LightningModule.load_from_checkpoint(path, map_location="cpu").eval()
    data = LightningDataModule.load_from_checkpoint(path)
    data.setup("validate")
    rows = list(itertools.islice(iter(data.val_dataloader()), batches))
    gpt = module.model
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(gpt.blocks))}
    hooks = [
        block.attn.qkv.register_forward_hook(lambda _m, _i, out, i=i: captured[i].append(out.detach()))
        for i, block in enumerate(gpt.blocks)
    ]
    losses = []
    try:
        with torch.no_grad():
            for x, y in rows:
                logits = gpt(x).double()
                losses.append(float(F.cross_entropy(logits.flatten(0, 1), y.flatten())))
    finally:
        for hook in hooks:
            hook.remove()
    metrics: dict[str, float] = {}
    for layer, outs in captured.items():
        attn = gpt.blocks[layer].attn
        qkv = torch.cat(outs)  # (B, T, 3C)
        b, t, _ = qkv.shape
        q, k, _v = qkv.split(attn.n_embd, dim=2)
        q = q.reshape(b, t, attn.n_head, attn.head_dim).transpose(1, 2)
        k = k.reshape(b, t, attn.n_head, attn.head_dim).transpose(1, 2)
        ent, norm = causal_head_means(q, k)
        for head in range(attn.n_head):
            metrics[f"entropy/attn/L{layer}/H{head}"] = float(ent[head])
            metrics[f"entropy/attn_norm/L{layer}/H{head}"] = float(norm[head])
    return metrics, math.fsum(losses) / len(losses)
