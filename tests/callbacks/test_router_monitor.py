"""RouterEntropyMonitor: values equal a float64 brute force from HF output_router_logits (padding excluded), the
training_step path equals the tap path, training is bit-identical with the monitor, hooks go away on every exit,
state survives a checkpoint, non-finite router rows are counted and never reach a logger."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from entrotrain.callbacks.router_monitor import RouterEntropyMonitor
from entrotrain.errors import EntrotrainError, TapError
from entrotrain.taps.router_tap import RouterTap
from tests.helpers.lightning_models import quiet_trainer
from tests.helpers.router_models import KINDS, MoELM, ToyMoE, gate_logits, lm_batch, lm_loader, toy_batches, toy_loader
from tests.helpers.router_reference import router_reference
from tests.helpers.spy_logger import SpyLogger

FIELDS = ("entropy", "entropy_norm", "tsallis", "load_entropy", "load_entropy_norm", "dead_frac", "top1_margin",
          "topk_margin")


def _router_hooks(model: torch.nn.Module) -> int:
    return sum("RouterTap" in getattr(h, "__qualname__", "") for m in model.modules() for h in m._forward_hooks.values())


def _expected(layers: list[torch.Tensor], top_k: int, mask: torch.Tensor | None, q: float = 1.1) -> dict[str, float]:
    out: dict[str, float] = {}
    norms, balance, dead = [], [], []
    for i, logits in enumerate(layers):
        ref = router_reference(logits, top_k, mask, q=q)
        for f in FIELDS:
            out[f"entropy/router/L{i}/{f}"] = ref[f]
        for e, share in enumerate(ref["load"]):
            out[f"entropy/router/L{i}/load/E{e}"] = share
        norms.append(ref["entropy_norm"])
        balance.append(ref["load_entropy_norm"])
        dead.append(ref["dead_frac"])
    out["entropy/router/entropy_norm_mean"] = sum(norms) / len(norms)
    out["entropy/router/load_entropy_norm_min"] = min(balance)
    out["entropy/router/dead_frac_max"] = max(dead)
    out["entropy/router/nonfinite"] = 0.0
    return out


def _assert_logged(logged: dict[str, float], expected: dict[str, float], tol: float = 1e-5) -> None:
    assert set(expected) == set(logged), sorted(set(expected) ^ set(logged))
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, abs=tol), key


@pytest.mark.parametrize("kind", KINDS)
def test_values_equal_brute_force_from_output_router_logits(kind):
    """Two micro-batches (gradient accumulation) of a right-padded batch: the monitor reads the mask from the batch."""
    n_experts = 8 if kind == "olmoe" else 4
    module = MoELM(kind, n_experts=n_experts, top_k=2)
    reference = copy.deepcopy(module.model)
    spy = SpyLogger()
    monitor = RouterEntropyMonitor(every_n_steps=1, log_media=False, print_summary=False)
    trainer = quiet_trainer(callbacks=[monitor], max_steps=1, accumulate_grad_batches=2, logger=spy)
    trainer.fit(module, lm_loader(2))
    batches = [lm_batch(seed=0), lm_batch(seed=1)]
    with torch.no_grad():
        outs = [reference(**b, output_router_logits=True).router_logits for b in batches]
    layers = [torch.cat([o[layer] for o in outs]) for layer in range(2)]
    mask = torch.cat([b["attention_mask"].reshape(-1) for b in batches])
    assert int(mask.sum()) < mask.numel()  # padding is there, and excluded
    expected = _expected(layers, 2, mask)
    _assert_logged(monitor.last_logged, expected)
    step, row = spy.rows[-1]
    assert step == 0 and all(row[k] == pytest.approx(v, abs=1e-5) for k, v in expected.items())
    assert spy.hparams[0]["entropy/router/layers"] == {
        "L0": "model.model.layers.0.mlp.gate",
        "L1": "model.model.layers.1.mlp.gate",
    }
    # padding really changes the numbers: the unmasked brute force differs
    assert any(abs(_expected(layers, 2, None)[k] - expected[k]) > 1e-4 for k in expected)


def test_training_step_router_logits_equal_tap_and_top_k_from_config():
    logged = []
    for returned in (False, True):
        module = MoELM("qwen2_moe", return_logits=returned)
        monitor = RouterEntropyMonitor(every_n_steps=2, log_media=False, print_summary=False)
        quiet_trainer(callbacks=[monitor], max_steps=3).fit(module, lm_loader(3))
        logged.append(monitor.last_logged)
        names = monitor.layer_names
    assert names == ["router_logits[0]", "router_logits[1]"]
    assert logged[0].keys() == logged[1].keys()
    for key in logged[0]:
        assert logged[0][key] == pytest.approx(logged[1][key], abs=1e-6), key


def test_bit_identical_training_and_hooks_removed():
    runs = []
    for with_monitor in (False, True):
        module = ToyMoE()
        callbacks = [RouterEntropyMonitor(every_n_steps=2, top_k=2, print_summary=False)] if with_monitor else []
        quiet_trainer(callbacks=callbacks, max_steps=4).fit(module, toy_loader(4))
        # armed only during logging steps (0 and 2), never otherwise
        assert module.hooked_steps == [(s, with_monitor and s % 2 == 0) for s in range(4)]
        runs.append((module.losses, [p.detach().clone() for p in module.parameters()]))
        assert _router_hooks(module) == 0
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_hooks_removed_on_exception():
    module = ToyMoE()
    module.fail_at = 1
    monitor = RouterEntropyMonitor(every_n_steps=1, top_k=1, print_summary=False)
    with pytest.raises(RuntimeError, match="boom"):
        quiet_trainer(callbacks=[monitor], max_steps=4).fit(module, toy_loader(4))
    assert _router_hooks(module) == 0 and not monitor.tap.armed


def test_nonfinite_rows_counted_never_logged_and_values_on_finite_rows():
    module = ToyMoE()
    module.nan_rows = [0]  # sample 0's first token goes NaN: one router row per layer
    reference = copy.deepcopy(module.blocks)
    spy = SpyLogger()
    monitor = RouterEntropyMonitor(every_n_steps=1, top_k=2, log_media=False, print_summary=False)
    with pytest.warns(UserWarning, match="NaN/Inf"):
        quiet_trainer(callbacks=[monitor], max_steps=1, logger=spy).fit(module, toy_loader(1))
    batch = toy_batches(1)[0]
    x = batch["x"].clone()
    x[0, 0, 0] = math.nan
    expected = _expected(gate_logits(reference, x), 2, batch["attention_mask"])
    expected["entropy/router/nonfinite"] = 2.0  # one row in each of the 2 layers
    _assert_logged(monitor.last_logged, expected)
    for _, row in spy.rows:
        assert all(math.isfinite(v) for v in row.values())


def test_state_dict_round_trip_and_summary(capsys):
    module = ToyMoE()
    monitor = RouterEntropyMonitor(every_n_steps=2, top_k=2, log_media=False)
    quiet_trainer(callbacks=[monitor], max_steps=3).fit(module, toy_loader(3))
    printed = capsys.readouterr().out
    assert "router entropy (2 MoE layers)" in printed and "dead_frac_max" in printed
    state = monitor.state_dict()
    assert state["layer_names"] == ["blocks.0.gate", "blocks.1.gate"] and [s for s, _ in state["history"]] == [0, 2]
    restored = RouterEntropyMonitor(every_n_steps=2, top_k=2)
    restored.load_state_dict(copy.deepcopy(state))
    assert restored.state_dict() == state
    assert monitor.load_matrix is not None and monitor.load_matrix.shape == (2, 4)
    assert torch.allclose(monitor.load_matrix.sum(1), torch.ones(2, dtype=torch.float64))


def test_configuration_errors():
    with pytest.raises(EntrotrainError):
        RouterEntropyMonitor(every_n_steps=0)
    with pytest.raises(EntrotrainError):
        RouterEntropyMonitor(q=0.0)
    with pytest.raises(EntrotrainError):
        RouterEntropyMonitor(dead_threshold=2.0)
    with pytest.raises(EntrotrainError):
        RouterEntropyMonitor(top_k=0)
    # include that matches nothing: at setup
    with pytest.raises(TapError, match="matches"):
        quiet_trainer(callbacks=[RouterEntropyMonitor(include=["nope*"])], max_steps=1).fit(ToyMoE(), toy_loader(1))
    # no HF config, no router top_k attribute, no top_k argument: say so
    module = ToyMoE()
    with pytest.raises(EntrotrainError, match="top_k"):
        quiet_trainer(callbacks=[RouterEntropyMonitor(every_n_steps=1)], max_steps=1).fit(module, toy_loader(1))
    assert _router_hooks(module) == 0
    # a model without routers that returns no router_logits: the discovery message
    plain = ToyMoE()
    with pytest.raises(TapError, match="include="):
        quiet_trainer(
            callbacks=[RouterEntropyMonitor(every_n_steps=1, top_k=1, exclude=["**"])], max_steps=1
        ).fit(plain, toy_loader(1))



def test_load_heatmap_to_wandb_and_run_record(monkeypatch, tmp_path):
    pytest.importorskip("PIL")
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    from entrotrain.dashboards.run_reader import load_run
    from entrotrain.dashboards.run_record import RunRecordLogger

    logger = WandbLogger(mode="disabled")
    calls: list[dict] = []
    monkeypatch.setattr(logger.experiment, "log", lambda row, *a, **k: calls.append(row))
    record = RunRecordLogger(tmp_path, version="v")
    monitor = RouterEntropyMonitor(every_n_steps=2, top_k=2, print_summary=False)
    quiet_trainer(callbacks=[monitor], max_steps=3, logger=[logger, record]).fit(ToyMoE(), toy_loader(3))
    media = [row for row in calls if "entropy/router/load_heatmap" in row]
    assert [row["trainer/global_step"] for row in media] == [0, 2]
    assert isinstance(media[0]["entropy/router/load_heatmap"], wandb.Image)
    items = load_run(tmp_path / "records" / "v").media["entropy/router/load_heatmap"]
    assert [item.step for item in items] == [0, 2]
    heat = items[-1].load()
    assert heat.shape == (2, 4) and abs(float(heat.sum()) - 2.0) < 1e-5  # each layer's shares sum to 1
    assert items[-1].meta["vmax"] == pytest.approx(0.5)  # twice the balanced share 1/4


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint")
def test_resume_keeps_layer_numbers_and_history(tmp_path):
    module = ToyMoE()
    first = RouterEntropyMonitor(every_n_steps=1, top_k=2, log_media=False, print_summary=False)
    trainer = quiet_trainer(callbacks=[first], max_steps=2)
    trainer.fit(module, toy_loader(4))
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    second = RouterEntropyMonitor(every_n_steps=1, top_k=2, log_media=False, print_summary=False)
    quiet_trainer(callbacks=[second], max_steps=4).fit(ToyMoE(), toy_loader(4), ckpt_path=str(ckpt))
    assert second.layer_names == first.layer_names
    assert [s for s, _ in second.history] == [0, 1, 2, 3]


def test_mask_that_does_not_fit_the_rows_is_ignored_with_a_warning():
    batches = toy_batches(1)
    batches[0]["attention_mask"] = batches[0]["attention_mask"][:, :3]  # 12 flags for 20 router rows
    monitor = RouterEntropyMonitor(every_n_steps=1, top_k=2, log_media=False, print_summary=False)
    reference = ToyMoE()
    module = copy.deepcopy(reference)
    with pytest.warns(UserWarning, match="keep mask has 12 entries"):
        quiet_trainer(callbacks=[monitor], max_steps=1).fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    with torch.no_grad():
        logits = reference.blocks[0].gate(batches[0]["x"]).reshape(-1, 4)
    assert monitor.last_logged["entropy/router/L0/entropy"] == pytest.approx(router_reference(logits, 2)["entropy"])


def test_the_monitor_refuses_orders_the_functional_refuses():
    with pytest.raises(EntrotrainError, match="q must be in"):  # before: refused only at the first logged step
        RouterEntropyMonitor(q=1e300)
    assert RouterEntropyMonitor(q=1e30).q == 1e30


class BiasedTopKRouter(torch.nn.Module):
    """A DeepSeek-V3 / MiniMax-M2 style router (HF 5.x ``*TopKRouter`` contract): sigmoid scores plus an
    ``e_score_correction_bias`` choose the experts, and it returns ``(router_logits, scores, indices)``."""

    def __init__(self, dim: int, n_experts: int, top_k: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n_experts, dim))
        self.register_buffer("e_score_correction_bias", torch.zeros(n_experts))
        self.e_score_correction_bias[-top_k:] = 10.0  # balancing moved every token to the last top_k experts
        self.top_k = top_k

    def forward(self, x):
        logits = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]), self.weight)
        scores = logits.sigmoid()
        _, index = torch.topk(scores + self.e_score_correction_bias, self.top_k, dim=-1)
        weights = scores.gather(1, index)
        return logits, weights / weights.sum(-1, keepdim=True), index


class BiasedMoE(ToyMoE):
    def __init__(self) -> None:
        super().__init__()
        self.router = BiasedTopKRouter(6, 4, 2)

    def training_step(self, batch, batch_idx):
        _, weights, index = self.router(batch["x"])
        return weights.sum() + 0.0 * index.sum() + super().training_step(batch, batch_idx)


def test_load_counts_the_experts_the_router_itself_picked():
    """A router whose choice is not the top k of its logits (sigmoid + correction bias) returns the ids it picked:
    the load is counted from them (all on experts 2 and 3 here: experts 0 and 1 are dead). Before, it was the top 2 of
    softmax(logits), experts the router did not pick, and dead_frac said 0."""
    monitor = RouterEntropyMonitor(every_n_steps=1, include=["router"], log_media=False, print_summary=False)
    quiet_trainer(callbacks=[monitor], max_steps=1).fit(BiasedMoE(), toy_loader(1))
    logged = monitor.last_logged
    loads = [logged[f"entropy/router/L0/load/E{e}"] for e in range(4)]
    assert loads == pytest.approx([0.0, 0.0, 0.5, 0.5], abs=1e-9)  # every real token: experts 2 and 3 (mask applied)
    assert logged["entropy/router/L0/dead_frac"] == pytest.approx(0.5)


def test_scoring_names_the_distribution_for_every_router():
    """``scoring="auto"`` reads the toy router's forward (sigmoid, no softmax) as sigmoid; naming ``"softmax"``
    overrides it, so the entropy is that of softmax(logits); the load (the router's own ids) is the same either way.
    An unknown scoring is refused at construction."""
    logged = {}
    for scoring in ("auto", "softmax", "sigmoid"):
        torch.manual_seed(0)
        module = BiasedMoE()
        monitor = RouterEntropyMonitor(every_n_steps=1, include=["router"], log_media=False, print_summary=False,
                                       scoring=scoring)
        quiet_trainer(callbacks=[monitor], max_steps=1).fit(module, toy_loader(1))
        logged[scoring] = monitor.last_logged
    assert logged["auto"] == logged["sigmoid"]
    key = "entropy/router/L0/entropy"
    assert logged["softmax"][key] != pytest.approx(logged["sigmoid"][key])
    for e in range(4):
        key = f"entropy/router/L0/load/E{e}"
        assert logged["softmax"][key] == logged["sigmoid"][key]
    with pytest.raises(EntrotrainError, match="scoring must be one of"):
        RouterEntropyMonitor(scoring="relu")


class LogitsOnlyBiasedRouter(BiasedTopKRouter):
    """DeepSeek-V3's TopkRouter contract: it returns the logits only; the block picks with the correction bias."""

    def forward(self, x):
        return super().forward(x)[0]


def test_a_corrected_router_that_does_not_return_its_choice_is_warned_about():
    module = BiasedMoE()
    module.router = LogitsOnlyBiasedRouter(6, 4, 2)
    module.training_step = lambda batch, batch_idx: module.router(batch["x"]).sum() + ToyMoE.training_step(
        module, batch, batch_idx
    )
    monitor = RouterEntropyMonitor(every_n_steps=1, include=["router"], log_media=False, print_summary=False)
    with pytest.warns(UserWarning, match="e_score_correction_bias"):
        quiet_trainer(callbacks=[monitor], max_steps=1).fit(module, toy_loader(1))


def _deepseek_choice(model: torch.nn.Module, batches: list[dict]) -> tuple[list[list[torch.Tensor]], list[list]]:
    """Brute force from the model's own routing: per MoE layer, the expert ids its experts module received (a hook
    on the MoE block's experts, the ids it computes with) and the router logits, for each batch."""
    picked: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    logits: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    handles = []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.mlp.experts.register_forward_pre_hook(lambda m, a, i=i: picked[i].append(a[1].clone())))
        handles.append(layer.mlp.gate.register_forward_hook(lambda m, a, o, i=i: logits[i].append(o[0].clone())))
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in handles:
        h.remove()
    return picked, logits


def test_deepseek_v3_load_is_the_model_s_own_choice_and_entropy_of_its_sigmoid_scores():
    """Tiny random DeepSeek-V3 (sigmoid router, e_score_correction_bias, group-limited top 2 of 8 experts in 4 groups;
    its DeepseekV3TopkRouter was not discovered before: TapError). Two right-padded micro-batches: the load equals a
    count of the ids the MoE block handed its experts over the real tokens, the entropy is of the normalised sigmoid
    scores, and both differ from the softmax top-k reading of the same logits."""
    module = MoELM("deepseek_v3", n_experts=8, top_k=2)
    reference = copy.deepcopy(module.model)
    monitor = RouterEntropyMonitor(every_n_steps=1, log_media=False, print_summary=False)
    quiet_trainer(callbacks=[monitor], max_steps=1, accumulate_grad_batches=2).fit(module, lm_loader(2))
    assert monitor.layer_names == ["model.model.layers.0.mlp.gate", "model.model.layers.1.mlp.gate"]
    batches = [lm_batch(seed=0), lm_batch(seed=1)]
    picked, logits = _deepseek_choice(reference, batches)
    keep = torch.cat([b["attention_mask"].reshape(-1) for b in batches]).bool()
    assert int(keep.sum()) < keep.numel()
    logged = monitor.last_logged
    for layer in range(2):
        ids = torch.cat(picked[layer])[keep]
        counts = torch.bincount(ids.reshape(-1), minlength=8).double()
        load = [logged[f"entropy/router/L{layer}/load/E{e}"] for e in range(8)]
        assert load == pytest.approx((counts / counts.sum()).tolist(), abs=1e-9)
        assert logged[f"entropy/router/L{layer}/dead_frac"] == pytest.approx(float((counts == 0).double().mean()))
        z = torch.cat(logits[layer])
        sig = router_reference(z, 2, keep, scoring="sigmoid")
        assert logged[f"entropy/router/L{layer}/entropy"] == pytest.approx(sig["entropy"], abs=1e-5)
        soft = router_reference(z, 2, keep)
        assert abs(soft["entropy"] - sig["entropy"]) > 1e-3
        if layer == 0:
            assert any(abs(a - b) > 1e-3 for a, b in zip(soft["load"], load))  # softmax top-k: not the choice
    unmasked = torch.cat(picked[0]).reshape(-1)  # padding changes the count: pad rows are left out
    counts_all = torch.bincount(unmasked, minlength=8).double()
    assert (counts_all / counts_all.sum()).tolist() != pytest.approx(
        [logged[f"entropy/router/L0/load/E{e}"] for e in range(8)], abs=1e-9
    )


def test_llama4_routers_are_found_and_read_from_their_logits():
    """Llama 4's Llama4Router (an nn.Linear subclass) returns (router_scores, router_logits) and routes each token to
    the top k of its logits: it is discovered (it was not: TapError), the tap reads element 1 (the logits; element 0
    holds sigmoid scores), and the monitor's values equal the reference on the router's own logits over the real
    tokens (padding left out). An explicit output_index still wins."""
    module = MoELM("llama4", n_experts=4, top_k=1)
    reference = copy.deepcopy(module.model)
    monitor = RouterEntropyMonitor(every_n_steps=1, log_media=False, print_summary=False)
    quiet_trainer(callbacks=[monitor], max_steps=1).fit(module, lm_loader(1))
    names = [f"model.model.layers.{i}.feed_forward.router" for i in range(2)]
    assert monitor.layer_names == names
    batch = lm_batch(seed=0)
    outputs = []
    handles = [layer.feed_forward.router.register_forward_hook(lambda m, a, o: outputs.append([t.clone() for t in o]))
               for layer in reference.model.layers]
    with torch.no_grad():
        reference(**batch)
    for h in handles:
        h.remove()
    logits = [out[1] for out in outputs]
    keep = batch["attention_mask"].reshape(-1).bool()
    logged = monitor.last_logged
    for layer in range(2):
        expected = router_reference(logits[layer], 1, keep)
        assert logged[f"entropy/router/L{layer}/entropy"] == pytest.approx(expected["entropy"], abs=1e-5)
        load = [logged[f"entropy/router/L{layer}/load/E{e}"] for e in range(4)]
        assert load == pytest.approx(expected["load"], abs=1e-9)
    for index, element in ((None, 1), (0, 0)):  # an explicit output_index (0: the scores) still wins
        tap = RouterTap(reference, output_index=index)
        with tap, torch.no_grad():
            reference(**batch)
        assert torch.equal(tap.logits(names[0].removeprefix("model.")), outputs[0][element].reshape(-1, 4))

