"""Tiny HF mixture-of-experts language models built from configs (random weights, no download) and a small
LightningModule that trains one, for the router tap / monitor tests."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule

KINDS = ("mixtral", "qwen2_moe", "olmoe")


def tiny_moe(kind: str, seed: int = 0, n_experts: int = 4, top_k: int = 2) -> torch.nn.Module:
    """A 2-layer, hidden-32 causal LM of ``kind`` with ``n_experts`` experts, ``top_k`` per token."""
    import transformers

    common = dict(
        vocab_size=48,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_experts_per_tok=top_k,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "mixtral":
        config = transformers.MixtralConfig(intermediate_size=48, num_local_experts=n_experts, **common)
        cls = transformers.MixtralForCausalLM
    elif kind == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(
            intermediate_size=48,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=24,
            num_experts=n_experts,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            **common,
        )
        cls = transformers.Qwen2MoeForCausalLM
    elif kind == "olmoe":
        config = transformers.OlmoeConfig(intermediate_size=24, num_experts=n_experts, **common)
        cls = transformers.OlmoeForCausalLM
    elif kind == "deepseek_v3":  # sigmoid router, e_score_correction_bias, group-limited top-k (not in KINDS)
        config = transformers.DeepseekV3Config(
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=n_experts,
            n_shared_experts=1,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=0,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            **{**common, "num_key_value_heads": 4},  # MLA: one key / value per head
        )
        cls = transformers.DeepseekV3ForCausalLM
    elif kind == "llama4":  # Llama4Router: an nn.Linear returning (router_scores, router_logits) (not in KINDS)
        config = transformers.Llama4TextConfig(
            intermediate_size=48, intermediate_size_mlp=48, head_dim=8, num_local_experts=n_experts,
            moe_layers=[0, 1], **common,
        )
        cls = transformers.Llama4ForCausalLM
    else:
        raise ValueError(kind)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).eval()
    if kind == "deepseek_v3":  # routers that are not near-uniform, and a correction bias that moves the choice
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.gate.weight.normal_(0.0, 0.5)
                layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(n_experts) * 0.3)
    return model


#: Router families the tap finds by class name, not by a ``*TopKRouter`` ending or an ``nn.Linear`` gate: those whose
#: routers return something else than ``(logits, weights, ids)``, and HunYuan-MoE (see :func:`tiny_family`).
FAMILIES = ("dbrx", "zaya", "gemma4", "switch", "nllb", "hunyuan")
#: Families that are encoder-decoder models (their batches carry decoder inputs and a decoder mask).
SEQ2SEQ = ("switch", "nllb")


def tiny_family(kind: str, seed: int = 0, n_experts: int = 4) -> torch.nn.Module:
    """A 2-layer (per stack), hidden-32 HF MoE model of ``kind`` in :data:`FAMILIES` in eval mode: DBRX (top 2),
    Zaya (top 1 of ``E`` experts and a skip class), Gemma 4 (top 2, MLP and MoE side by side), Switch-Transformers
    (top 1, expert capacity 3: tokens get dropped), NLLB-MoE (top 2, eval capacity 20 % of the tokens) and HunYuan-MoE
    (top 2; its router is the ``HunYuanMoEV1Gate`` module ``mlp.gate``, a shared MLP beside the experts)."""
    import transformers

    small = dict(vocab_size=48, pad_token_id=0)
    if kind == "dbrx":
        config = transformers.DbrxConfig(
            d_model=32, n_heads=4, n_layers=2, max_seq_len=64, attn_config={"kv_n_heads": 2, "clip_qkv": 8.0},
            ffn_config={"ffn_hidden_size": 24, "moe_num_experts": n_experts, "moe_top_k": 2}, **small,
        )
        config.attn_config.rope_theta = config.rope_parameters["rope_theta"]  # 5.25's DbrxAttention reads it there
        cls = transformers.DbrxForCausalLM
    elif kind == "zaya":  # 5.25 accepts num_experts_per_tok=1 only
        config = transformers.ZayaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=n_experts,
            num_experts_per_tok=1, moe_intermediate_size=16, router_hidden_size=16, max_position_embeddings=64,
            eos_token_id=2, **small,
        )
        cls = transformers.ZayaForCausalLM
    elif kind == "gemma4":
        config = transformers.Gemma4TextConfig(
            hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, enable_moe_block=True, num_experts=n_experts, top_k_experts=2, moe_intermediate_size=16,
            vocab_size_per_layer_input=48, hidden_size_per_layer_input=8, max_position_embeddings=64, **small,
        )
        cls = transformers.Gemma4ForCausalLM
    elif kind == "switch":
        config = transformers.SwitchTransformersConfig(
            d_model=32, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=4, num_experts=n_experts,
            expert_capacity=3, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, decoder_start_token_id=0,
            **small,
        )
        cls = transformers.SwitchTransformersForConditionalGeneration
    elif kind == "nllb":
        config = transformers.NllbMoeConfig(
            d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=32, decoder_ffn_dim=32, num_experts=n_experts, encoder_sparse_step=1, decoder_sparse_step=1,
            moe_eval_capacity_token_fraction=0.2, max_position_embeddings=64, decoder_start_token_id=2,
            **{**small, "pad_token_id": 1},
        )
        cls = transformers.NllbMoeForConditionalGeneration
    elif kind == "hunyuan":
        config = transformers.HunYuanMoEV1Config(
            hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, num_experts=n_experts, moe_topk=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
            **small,
        )
        cls = transformers.HunYuanMoEV1ForCausalLM
    else:
        raise ValueError(kind)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # routers far from uniform, so that top-k choices and capacities bite
        for module in model.modules():
            kind_name = type(module).__name__
            if kind_name == "ZayaRouter":
                module.router_mlp.out_proj.weight.normal_(0.0, 2.0)
                module.balancing_biases.zero_()  # the skip class competes (5.25 starts it at -1)
            elif kind_name in (
                "DbrxRouter", "Gemma4TextRouter", "SwitchTransformersTop1Router", "NllbMoeTop2Router",
                "HunYuanMoEV1Gate",
            ):
                for p in module.parameters():
                    if p.dim() == 2:
                        p.normal_(0.0, 1.0)
    return model


def family_batch(kind: str, seed: int = 0) -> dict:
    """A right-padded :func:`lm_batch` (3 x 7, ids >= 3) for ``kind``; encoder-decoder families also get
    ``decoder_input_ids`` (3 x 5) and a right-padded ``decoder_attention_mask`` (0, 1, 2 pads)."""
    batch = lm_batch(seed=seed)
    batch["input_ids"] = batch["input_ids"] % 45 + 3  # no pad / bos / eos id inside the real tokens
    if kind in SEQ2SEQ:
        g = torch.Generator().manual_seed(seed + 100)
        batch["decoder_input_ids"] = torch.randint(3, 48, (3, 5), generator=g)
        batch["decoder_attention_mask"] = torch.tensor([[1] * 5, [1] * 4 + [0], [1] * 3 + [0] * 2])
    return batch


def lm_batch(batch: int = 3, seq: int = 7, seed: int = 0, pad_last: tuple[int, ...] = (0, 2, 4)) -> dict:
    """Random tokens with a right-padded ``attention_mask`` (row ``b`` ends with ``pad_last[b]`` pads)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 48, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b in range(batch):
        n = pad_last[b % len(pad_last)]
        if n:
            mask[b, seq - n :] = 0
    return {"input_ids": ids, "attention_mask": mask}


class MoELM(LightningModule):
    """Trains a tiny HF MoE LM on the batches of :func:`lm_batch`; ``return_logits`` also returns the router logits
    from ``training_step`` (``output_router_logits=True``)."""

    def __init__(self, kind: str = "mixtral", n_experts: int = 4, top_k: int = 2, return_logits: bool = False,
                 lr: float = 1e-2, seed: int = 0) -> None:
        super().__init__()
        self.model = tiny_moe(kind, seed=seed, n_experts=n_experts, top_k=top_k).train()
        self.return_logits = return_logits
        self.lr = lr
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["input_ids"],
            output_router_logits=self.return_logits,
        )
        self.losses.append(float(out.loss.detach()))
        if self.return_logits:
            return {"loss": out.loss, "router_logits": out.router_logits, "router_mask": batch["attention_mask"]}
        return out.loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def lm_loader(n_batches: int = 4, seed: int = 0, **kwargs) -> torch.utils.data.DataLoader:
    """A loader yielding ``n_batches`` ready-made :func:`lm_batch` dicts (``batch_size=None``: no collation)."""
    return torch.utils.data.DataLoader([lm_batch(seed=seed + i, **kwargs) for i in range(n_batches)], batch_size=None)


class ToyMoeBlock(torch.nn.Module):
    """A soft mixture of ``n_experts`` linear experts behind a ``gate`` router (discovered as a MoE gate)."""

    def __init__(self, dim: int = 6, n_experts: int = 4) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(dim, n_experts)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.gate(x).softmax(-1)
        return x + sum(w[..., e : e + 1] * expert(x) for e, expert in enumerate(self.experts))


class ToyMoE(LightningModule):
    """Two :class:`ToyMoeBlock` layers on ``batch["x"]`` ``(B, T, D)``; regression to ``batch["y"]``. ``nan_rows``:
    sample indices whose input is NaN from ``nan_from_step`` on (their router rows go non-finite); ``fail_at``: raise
    in ``training_step`` from that step."""

    def __init__(self, dim: int = 6, n_experts: int = 4, lr: float = 0.05, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = torch.nn.Sequential(ToyMoeBlock(dim, n_experts), ToyMoeBlock(dim, n_experts))
        self.lr = lr
        self.nan_rows: list[int] = []
        self.fail_at: int | None = None
        self.losses: list[float] = []
        self.hooked_steps: list[tuple[int, bool]] = []  # (global_step, a forward hook on a gate during the step)

    def training_step(self, batch, batch_idx):
        self.hooked_steps.append((self.global_step, any(b.gate._forward_hooks for b in self.blocks)))
        if self.fail_at is not None and self.global_step >= self.fail_at:
            raise RuntimeError("boom")
        x = batch["x"].clone()
        if self.nan_rows:
            x[self.nan_rows, 0, 0] = float("nan")
        out = self.blocks(x)
        loss = torch.nn.functional.mse_loss(out[torch.isfinite(out).all(-1)], batch["y"][torch.isfinite(out).all(-1)])
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def gate_logits(blocks: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """What a router tap sees in :class:`ToyMoE`: each :class:`ToyMoeBlock`'s gate logits on its input, flattened to
    ``(tokens, n_experts)``, one per layer in order (``x`` through ``blocks`` without gradient)."""
    layers, h = [], x
    with torch.no_grad():
        for block in blocks:
            layers.append(block.gate(h).reshape(-1, block.gate.out_features))
            h = block(h)
    return layers


def toy_batches(n: int = 4, batch: int = 4, seq: int = 5, dim: int = 6, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[1:, -2:] = 0
        out.append({"x": torch.randn(batch, seq, dim, generator=g), "y": torch.randn(batch, seq, dim, generator=g),
                    "attention_mask": mask})
    return out


def toy_loader(n: int = 4, seed: int = 0) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(toy_batches(n, seed=seed), batch_size=None)
