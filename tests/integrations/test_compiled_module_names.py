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
