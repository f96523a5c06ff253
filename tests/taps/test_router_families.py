"""RouterTap and RouterEntropyMonitor on the HF routers that do not return ``(logits, weights, ids)``: DBRX (logits
only), Zaya (a skip class written back as id 0), Gemma 4 (probabilities: the logits are its ``proj`` output),
Switch-Transformers and NLLB-MoE (a dispatch mask first, capacity drops, encoder-decoder); and HunYuan-MoE, whose
``HunYuanMoEV1Gate`` returns ``(logits, weights, ids)`` but is neither a ``*TopKRouter`` nor an ``nn.Linear`` gate.
Each was a TapError (not discovered, or an integer tensor read as logits) before. For each family a tiny model built
from its config runs one right-padded forward; the monitor's load must equal a count of what the MoE block hands its
experts over the real tokens (each stack's own mask: an encoder-decoder's decoder routers use the decoder mask), and
its entropy a float64 brute force of the router's own softmax of its logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from entrotrain.callbacks.router_monitor import RouterEntropyMonitor
from entrotrain.taps.router_tap import RouterTap, router_choice
from tests.helpers.router_models import FAMILIES, SEQ2SEQ, family_batch, tiny_family, tiny_moe
from tests.helpers.router_reference import router_reference

ROUTERS = (
    "DbrxRouter", "ZayaRouter", "Gemma4TextRouter", "SwitchTransformersTop1Router", "NllbMoeTop2Router",
    "HunYuanMoEV1Gate",
)
TOP_K = {"dbrx": 2, "zaya": 1, "gemma4": 2, "switch": 1, "nllb": 2, "hunyuan": 2}


def _record(model: nn.Module) -> tuple[dict, dict, list]:
    """Per router module name: the logits it scores (its own output's logits; Gemma 4: its ``proj`` output) and the
    arguments its sibling ``experts`` module was called with (the dispatch of the MoE block)."""
    modules = dict(model.named_modules())
    logits: dict[str, torch.Tensor] = {}
    dispatch: dict[str, tuple] = {}
    handles = []
    for name, module in modules.items():
        kind = type(module).__name__
        if kind not in ROUTERS:
            continue
        if kind == "Gemma4TextRouter":
            source, element = module.proj, None
        else:
            source, element = module, {"DbrxRouter": None, "ZayaRouter": 0, "HunYuanMoEV1Gate": 0}.get(kind, 2)

        def keep_logits(m, a, out, name=name, element=element):
            z = out if element is None else out[element]
            logits[name] = z.detach().reshape(-1, z.shape[-1]).clone()

        handles.append(source.register_forward_hook(keep_logits))
        experts = getattr(modules[name.rsplit(".", 1)[0]], "experts")
        handles.append(experts.register_forward_pre_hook(
            lambda m, a, name=name: dispatch.__setitem__(name, tuple(t.detach().clone() for t in a))
        ))
    return logits, dispatch, handles


def _dispatched_counts(kind: str, args: tuple, logits: torch.Tensor, keep: torch.Tensor, module: nn.Module):
    """Per-expert count of the (token, expert) pairs the block dispatched over the kept rows, and how many kept
    tokens lost an expert to the capacity (Switch / NLLB) or went to Zaya's skip class."""
    n = logits.shape[-1]
    if kind in ("dbrx", "gemma4", "hunyuan"):  # experts(hidden, top-k ids, weights)
        ids = args[1][keep]
        return torch.bincount(ids.reshape(-1), minlength=n).double(), 0
    if kind == "zaya":  # the router's own rule, from its logits: top 1 of softmax + balancing biases; E = skip
        choice = torch.topk(torch.softmax(logits.float(), -1) + module.balancing_biases, 1, dim=-1).indices
        skip = choice == n - 1
        assert torch.equal(args[1], torch.where(skip, 0, choice))  # the block gets skip as expert 0 ...
        assert bool((args[2][skip] == 0).all())  # ... with weight 0
        return torch.bincount(choice[keep].reshape(-1), minlength=n).double(), int(skip[keep].sum())
    gates = (args[1].reshape(-1, n) if kind == "switch" else args[2]) != 0  # one-hot dispatch / combine weights
    dropped = int((gates[keep].sum(-1) < TOP_K[kind]).sum())
    return gates[keep].sum(0).double(), dropped


@pytest.mark.parametrize("kind", FAMILIES)
def test_family_is_discovered_and_the_monitor_counts_what_the_block_dispatches(kind):
    model = tiny_family(kind)
    batch = family_batch(kind)
    monitor = RouterEntropyMonitor(every_n_steps=1, log_media=False, print_summary=False)
    monitor.bind(model)
    tap = monitor.tap
    assert tap is not None and len(tap.names) == (4 if kind in SEQ2SEQ else 2)
    assert [tap.top_k(n) for n in tap.names] == [TOP_K[kind]] * len(tap.names)
    logits, dispatch, handles = _record(model)
    with tap, torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()
    monitor._consume(None, batch, 0)
    metrics = monitor.compute_metrics(0)
    assert monitor.layer_names == list(tap.order) and set(monitor.layer_names) == set(logits)
    modules = dict(model.named_modules())
    masks = {"encoder": batch["attention_mask"], "decoder": batch.get("decoder_attention_mask")}
    lost = 0
    for i, name in enumerate(monitor.layer_names):
        stack = "decoder" if kind in SEQ2SEQ and ".decoder." in f".{name}" else "encoder"
        keep = masks[stack].reshape(-1).bool()
        z = logits[name]
        assert z.shape[0] == keep.numel() and int(keep.sum()) < keep.numel()  # padding is there
        counts, dropped = _dispatched_counts(kind, dispatch[name], z, keep, modules[name])
        lost += dropped
        load = [metrics[f"entropy/router/L{i}/load/E{e}"] for e in range(z.shape[-1])]
        assert load == pytest.approx((counts / counts.sum()).tolist(), abs=1e-9), name
        ref = router_reference(z, TOP_K[kind], keep)
        assert metrics[f"entropy/router/L{i}/entropy"] == pytest.approx(ref["entropy"], abs=1e-5), name
        assert metrics[f"entropy/router/L{i}/tsallis"] == pytest.approx(ref["tsallis"], abs=1e-5), name
        assert torch.equal(tap.logits(name), z.reshape(-1, z.shape[-1]))
    if kind in ("zaya", "switch", "nllb"):  # the case the ids are read for happened: a skip, a capacity drop
        assert lost > 0


def test_gemma4_reads_the_logits_of_proj_not_the_probabilities_it_returns():
    """Gemma4TextRouter returns softmax probabilities: the tap reads the scores of its proj Linear (exact logits,
    also for a router z-loss), whose softmax is what it returned; the choice is the ids it returned."""
    model = tiny_family("gemma4")
    router = model.model.layers[0].router
    returned = []
    handle = router.register_forward_hook(lambda m, a, out: returned.append([t.clone() for t in out]))
    tap = RouterTap(model)
    assert tap.names == ["model.layers.0.router", "model.layers.1.router"]
    with tap, torch.no_grad():
        model(**family_batch("gemma4"))
    handle.remove()
    probs, _, ids = returned[0]
    z = tap.logits("model.layers.0.router")
    assert torch.allclose(torch.softmax(z, -1), probs, atol=1e-6) and not torch.allclose(z.exp(), probs)
    assert torch.equal(tap.chosen_experts("model.layers.0.router"), ids)
    assert not any(tap._child_logits.values())  # nothing kept past the router's call


def test_a_replayed_capture_reads_the_router_s_own_element():
    """Under torch.compile the hooks' captures are replayed with module=None: the router's own element and logits
    child must still apply (before, a Llama4Router replay read element 0, its sigmoid scores, as logits)."""
    model = tiny_moe("llama4", n_experts=4, top_k=1)
    tap = RouterTap(model)
    name = tap.names[0]
    scores, logits = torch.rand(6, 4), torch.randn(6, 4)
    tap._hook(name)(None, (), (scores, logits))
    assert torch.equal(tap.captures[name][0], logits)


def test_router_choice_of_dispatch_masks_and_the_zaya_skip_class():
    one_hot = torch.tensor([[[0, 1, 0], [0, 0, 0]], [[1, 0, 0], [0, 0, 1]]])  # token (0, 1) dropped by capacity
    switch = type("SwitchTransformersTop1Router", (nn.Module,), {})()
    assert router_choice(switch, (one_hot, None, torch.zeros(2, 2, 3)), 4).tolist() == [[1], [-1], [0], [2]]
    nllb = type("NllbMoeTop2Router", (nn.Module,), {})()
    gates = torch.tensor([[0.7, 0.0, 0.3], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # top 2 kept / one dropped / both
    got = router_choice(nllb, (None, gates, torch.zeros(3, 3)), 3)
    assert [sorted(r) for r in got.tolist()] == [[0, 2], [-1, 1], [-1, -1]]
    zaya = type("ZayaRouter", (nn.Module,), {})()
    ids, weights = torch.tensor([[0], [0], [2]]), torch.tensor([[0.0], [0.4], [0.9]])
    out = (torch.zeros(3, 4), weights, ids, torch.zeros(1, 3, 8))  # 3 experts + skip
    assert router_choice(zaya, out, 3).tolist() == [[3], [0], [2]]
    odd = (torch.zeros(3, 4), torch.zeros(2), ids, torch.zeros(1, 3, 8))  # weights that do not fit: ids as returned
    assert router_choice(zaya, odd, 3).tolist() == [[0], [0], [2]]


def test_a_z_loss_captured_on_gemma4_sees_the_proj_logits_and_trains_them():
    """RouterZLoss.capture on Gemma 4: the loss is of the proj logits (not of log-probabilities, whose logsumexp is
    0), over the real tokens, and its gradient reaches the router's proj weight."""
    from entrotrain.functional.router_losses import router_z_loss
    from entrotrain.regularizers import RouterZLoss

    model = tiny_family("gemma4")
    batch = family_batch("gemma4")
    logits = []
    handles = [layer.router.proj.register_forward_hook(lambda m, a, out: logits.append(out.detach().clone()))
               for layer in model.model.layers]
    reg = RouterZLoss(1.0)
    with reg.capture(model):
        model(**batch)
    for h in handles:
        h.remove()
    loss = reg().total
    keep = batch["attention_mask"].reshape(-1).bool()
    value = float(loss.detach())
    assert value == pytest.approx(float(router_z_loss(logits, mask=keep)), rel=1e-6) and value > 1e-3
    loss.backward()
    assert all(layer.router.proj.weight.grad is not None for layer in model.model.layers)
