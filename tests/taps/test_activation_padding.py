"""Padding is not data for representations either: ActivationTap (RepresentationEntropyMonitor, the representation
regularisers) leaves out the padded token positions of a ``(B, T, C)`` output, from the ``attention_mask`` of the HF
model running the module or a ``query_padding`` block. Before, every position was captured: on a padded SFT batch
RankMe counted the pad tokens' hidden states, ``n`` was the padded shape, and the value changed with the padding side
and the micro-batch split (HF Trainer vs a loop on the same rows: 31.03 / 31.04 / 31.11)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.callbacks.representation_monitor import RepresentationEntropyMonitor
from entrotrain.integrations.loop import EntropyMonitors
from entrotrain.taps import ActivationTap, query_padding
from tests.helpers.tiny_hf_lms import padded_rows, stack_rows, tiny_gpt2_lm

pytestmark = pytest.mark.usefixtures("one_thread")


def _repr_logs(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    monitors = EntropyMonitors(
        [RepresentationEntropyMonitor(include=["transformer.h.1"], stage="train", max_tokens=None,
                                      print_summary=False)], every_n_steps=1,
    )  # fmt: skip
    with monitors.watch(model), torch.no_grad():
        with monitors.step(0):
            for batch in batches:
                with torch.enable_grad():
                    model(**batch)
    return monitors.logs


def test_hf_padded_positions_left_out_and_split_invariant() -> None:
    pytest.importorskip("transformers")
    model = tiny_gpt2_lm(16, 8)
    rows = padded_rows(8, 16, 8)  # right-padded: row r keeps 8 - r % 4 tokens
    real = sum(int(r["attention_mask"].sum()) for r in rows)
    padded = _repr_logs(model, [stack_rows(rows)])
    unpadded = _repr_logs(model, [{k: v[: int(r["attention_mask"].sum())][None] for k, v in r.items()} for r in rows])
    key = "entropy/repr/transformer.h.1"
    assert padded[f"{key}/n_streamed"] == unpadded[f"{key}/n_streamed"] == real  # was 8 * 8 = 64 with padding
    for measure in ("rankme", "effective_rank", "matrix_entropy"):
        assert padded[f"{key}/{measure}"] == pytest.approx(unpadded[f"{key}/{measure}"], rel=1e-5)


@settings(max_examples=20, deadline=None)
@given(lengths=st.lists(st.integers(0, 6), min_size=1, max_size=4), max_tokens=st.sampled_from([None, 2, 4]))
def test_query_padding_block_keeps_exactly_the_real_picked_tokens(lengths: list[int], max_tokens: int | None) -> None:
    """Plain module in a ``query_padding`` block: the rows are the real positions among the evenly spaced picks."""
    model = torch.nn.Sequential(torch.nn.Identity())
    x = torch.arange(len(lengths) * 6 * 2, dtype=torch.float32).reshape(len(lengths), 6, 2)
    mask = torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]
    tap = ActivationTap(model, include=["0"], max_tokens=max_tokens)
    with tap, query_padding(mask):
        model(x)
    picked = torch.arange(6) if max_tokens is None else torch.linspace(0, 5, max_tokens).round().long()
    want = torch.cat([x[b, picked][mask[b, picked]] for b in range(len(lengths))])
    got = tap.rows("0") if tap.captures else torch.zeros(0, 2)
    assert torch.equal(got, want)
