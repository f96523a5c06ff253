"""A compiled model's σReparam keys and prediction-head glob are those of the bare model (no ``_orig_mod``):
SigmaReparamMonitor.collect and PredictionEntropyMonitor._find_head walked ``module.named_modules()`` instead of
entrotrain.taps.module_names.named_modules (found through EntropyMonitors; Lightning had the same names)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from entrotrain.callbacks.prediction_monitor import PredictionEntropyMonitor
from entrotrain.callbacks.sigma_reparam_monitor import SigmaReparamMonitor
from entrotrain.integrations.loop import EntropyMonitors
from entrotrain.models import TinyGPT
from entrotrain.regularizers.sigma_reparam import sigma_reparam
from tests.helpers.compile_count import CountingBackend, fresh_dynamo
from tests.helpers.torch_release import needs_torch

VOCAB, SEQ = 29, 12


def _model() -> TinyGPT:
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=2, n_embd=16)
    return sigma_reparam(model, exclude=("lm_head",))


def _logs(net, model, monitors: list, steps: int = 2) -> dict[int, dict[str, float]]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randint(0, VOCAB, (4, SEQ + 1), generator=torch.Generator().manual_seed(0))
    logs = {}
    with EntropyMonitors(monitors, print_summary=False).watch(net, opt) as mons:
        for step in range(steps):
            with mons.step(step):
                F.cross_entropy(net(x[:, :-1]).reshape(-1, VOCAB), x[:, 1:].reshape(-1)).backward()
                opt.step()
                opt.zero_grad()
            logs[step] = dict(mons.logs)
    return logs


def test_sigma_reparam_keys_of_a_compiled_model_are_the_bare_model_keys():
    eager_model = _model()
    eager = _logs(eager_model, eager_model, [SigmaReparamMonitor(every_n_steps=1)])
    model = _model()
    with fresh_dynamo():
        compiled = _logs(torch.compile(model, backend=CountingBackend()), model, [SigmaReparamMonitor(every_n_steps=1)])
    assert "sigma_reparam/blocks.0.attn.qkv/sigma" in eager[0]
    assert set(compiled[0]) == set(eager[0]), sorted(set(compiled[0]) ^ set(eager[0]))[:4]


def test_prediction_head_glob_of_a_compiled_model_is_the_bare_model_name():
    model = _model()
    with fresh_dynamo():
        logs = _logs(torch.compile(model, backend=CountingBackend()), model, [PredictionEntropyMonitor(
            every_n_steps=1, source="head", head="lm_head", log_media=False, print_summary=False)])
    assert "entropy/pred/train/mean" in logs[0]


@needs_torch(
    2, 4, "dynamo of torch 2.3 breaks the graph inside the chunked log-prob autograd.Function (call_method is_complex)"
)
def test_prediction_head_with_labels_adds_no_graph_break_to_a_compiled_forward() -> None:
    """The head hook scores each forward inside the compiled region; the label range (``labels.max()``, a host
    read) is checked before the forward, so a logging step with labels breaks no graph."""
    from tests.helpers.compile_count import graph_breaks
    from tests.helpers.loop_runs import LogitsGPT

    torch.manual_seed(0)
    module = LogitsGPT(seed=0, convert=False)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    x = torch.randint(0, module.model.vocab_size, (4, 9), generator=torch.Generator().manual_seed(0))
    monitor = PredictionEntropyMonitor(every_n_steps=1, source="head", head="model.lm_head", log_media=False,
                                       print_summary=False)  # fmt: skip
    with fresh_dynamo():
        compiled = torch.compile(module, backend=CountingBackend())
        with EntropyMonitors([monitor], print_summary=False).watch(compiled, opt) as mons:
            for step in range(2):
                with mons.step(step):
                    logits = compiled(input_ids=x[:, :-1], labels=x[:, 1:])
                    F.cross_entropy(logits.reshape(-1, module.model.vocab_size), x[:, 1:].reshape(-1)).backward()
                    opt.step()
                    opt.zero_grad()
                assert "entropy/pred/train/nll" in mons.logs, sorted(mons.logs)
        assert not graph_breaks(), graph_breaks()
