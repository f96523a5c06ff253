"""Tiny HF causal LMs built from configs (random weights, no download), each drawn after ``torch.manual_seed(seed)``,
and rows to train them on: shared by the Trainer / compile tests and the DDP run scripts that must build the same
model as their test."""

from __future__ import annotations

import torch


def tiny_gpt2_lm(vocab: int, t: int, seed: int = 0) -> torch.nn.Module:
    """A 2-layer, width-16, 2-head ``GPT2LMHeadModel`` with ``t`` positions and no dropout (runs are comparable),
    its weights drawn after ``torch.manual_seed(seed)``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_positions=t, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def lm_rows(rows: int, vocab: int, t: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """``rows`` unpadded rows of ``t`` random ids; the labels are the ids."""
    ids = torch.randint(0, vocab, (rows, t), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": r, "labels": r} for r in ids]


def tiny_mixtral_lm(vocab: int, seed: int = 0, experts: int = 4, top_k: int = 2) -> torch.nn.Module:
    """A 2-layer, hidden-16 ``MixtralForCausalLM`` (2 heads, 1 KV head) with ``experts`` experts, ``top_k`` per
    token, its weights drawn after ``torch.manual_seed(seed)``."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=32,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return MixtralForCausalLM(config)


def padded_rows(rows: int, vocab: int, t: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Right-padded rows: row r keeps its first ``t - r % 4`` tokens (ids in 1..vocab-1, padding id 0); padded
    labels are -100."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in range(rows):
        ids = torch.randint(1, vocab, (t,), generator=g)
        mask = (torch.arange(t) < t - r % 4).long()
        ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)})
    return out


def stack_rows(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One batch of ``rows`` (each field stacked along a new first dimension)."""
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def tiny_llama_lm(vocab: int, impl: str = "sdpa", seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-layer, hidden-32 ``LlamaForCausalLM`` with grouped-query attention (4 heads, 2 KV heads), 32 positions,
    no attention dropout, attention implementation ``impl``; ``overrides`` go to the config (e.g.
    ``initializer_range``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, attention_dropout=0.0, attn_implementation=impl,
        **overrides,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
