"""The scratch variant of the arithmetic task: responses ``digits* = answer <eos>``; reward, phases, warm start."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.errors import EntrotrainError
from entrotrain.tasks.arithmetic import (
    EOS,
    PAD,
    SEPARATOR,
    VOCAB,
    ArithmeticDataModule,
    ArithmeticTask,
    decode,
    encode,
)
from entrotrain.tasks.grpo import GRPOTask, response_mask
from tests.helpers.lightning_models import quiet_trainer
from tests.helpers.recorders import OutputsRecorder

EQ = encode("=")[0]
DIGITS = set(range(3, 13))


def _resp(text: str, length: int, eos: bool = True) -> list[int]:
    """Ids of ``text`` (``=`` is the separator), optionally ``<eos>``, padded / cut to ``length``."""
    ids = encode(text) + ([EOS] if eos else [])
    return (ids + [PAD] * length)[:length]


def _reference_reward(ids: list[int], answer: int, reverse: bool = False) -> float:
    """Brute force on strings: ``digits* = answer <eos>`` before the budget ends, the scratch only digits."""
    if EOS not in ids:
        return 0.0
    body = ids[: ids.index(EOS)]
    if SEPARATOR not in body:
        return 0.0
    k = body.index(SEPARATOR)
    if any(i not in DIGITS for i in body[:k]):
        return 0.0
    text = "".join(VOCAB[i] for i in body[k + 1 :])
    want = str(answer)[::-1] if reverse else str(answer)
    return float(text == want)


def _reference_phases(ids: list[int], valid: list[bool]) -> list[int]:
    out, phase = [], 0
    for i, v in zip(ids, valid):
        if not v:
            out.append(-1)
            continue
        if i == SEPARATOR:
            phase = 1
        out.append(phase)
    return out


def test_separator_is_equals_and_budget():
    assert SEPARATOR == EQ
    plain = ArithmeticTask(num_digits=1)
    t = ArithmeticTask(num_digits=1, scratch_tokens=8)
    assert plain.max_new_tokens == 3 and plain.separator_id is None
    assert t.max_new_tokens == 8 + 1 + 2 + 1 and t.separator_id == SEPARATOR
    assert ArithmeticTask(num_digits=2, operation="mul", scratch_tokens=3).max_new_tokens == 3 + 1 + 4 + 1
    resp = torch.tensor([_resp("12", 3)])
    assert plain.phase_ids(resp, response_mask(resp)) is None  # plain task: no phases (GRPO returns none)


@pytest.mark.parametrize(
    "text,eos,reward",
    [
        ("=12", True, 1.0),  # empty scratch
        ("4916=12", True, 1.0),
        ("1==12", True, 0.0),  # the answer starts after the FIRST separator: "=12" is not 12
        ("491612", True, 0.0),  # no separator
        ("49+1=12", True, 0.0),  # malformed scratch (an operator)
        ("49=13", True, 0.0),  # wrong answer
        ("49=012", True, 0.0),  # leading zero
        ("49=12", False, 0.0),  # no <eos>
        ("=1", True, 0.0),  # truncated
    ],
)
def test_scratch_reward_hand_cases(text, eos, reward):
    t = ArithmeticTask(num_digits=1, scratch_tokens=8)
    ids = _resp(text, t.max_new_tokens, eos=eos)
    assert t.reward(torch.tensor([ids]), torch.tensor([12])).tolist() == [reward]


def test_scratch_reward_separator_after_eos_budget_and_tail():
    t = ArithmeticTask(num_digits=1, scratch_tokens=3)
    R = t.max_new_tokens  # 3 + 1 + 2 + 1 = 7
    ans = torch.tensor([12])
    eos_first = [EOS] + _resp("=12", R - 1)
    assert t.reward(torch.tensor([eos_first]), ans).tolist() == [0.0]  # <eos> ends the response before "="
    over = _resp("12345=12", R)  # scratch over budget: the answer is cut off
    assert t.reward(torch.tensor([over]), ans).tolist() == [0.0]
    full = _resp("123=12", R)  # exactly the budget
    assert full[-1] == EOS and t.reward(torch.tensor([full]), ans).tolist() == [1.0]
    tail = _resp("=12", R)
    tail[4:] = encode("9=9")  # anything after <eos> is ignored
    assert t.reward(torch.tensor([tail]), ans).tolist() == [1.0]
    assert t.reward(torch.zeros(0, R, dtype=torch.long), torch.zeros(0, dtype=torch.long)).shape == (0,)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    num_digits=st.integers(1, 2),
    op=st.sampled_from(["add", "sub", "mul"]),
    reverse=st.booleans(),
    scratch=st.integers(1, 5),
)
def test_scratch_reward_and_phases_match_brute_force(seed, num_digits, op, reverse, scratch):
    t = ArithmeticTask(num_digits=num_digits, operation=op, reverse_answer=reverse, scratch_tokens=scratch)
    g = torch.Generator().manual_seed(seed)
    n = 64
    x, y, m = t.supervised_batch(n, noise=0.0, generator=g)
    p = t.prompt_length
    resp = y[:, p - 1 :]
    answers = t.result(*_operands(x[:, : p], t))
    # corrupt some tokens: any vocabulary id, extra separators and <eos>
    flip = torch.rand(resp.shape, generator=g) < 0.08
    resp = torch.where(flip, torch.randint(0, len(VOCAB), resp.shape, generator=g), resp)
    got = t.reward(resp, answers)
    mask = response_mask(resp)
    phases = t.phase_ids(resp, mask)
    for i in range(n):
        ids = resp[i].tolist()
        assert got[i].item() == _reference_reward(ids, int(answers[i]), reverse), decode(ids, stop_at_eos=False)
        assert phases[i].tolist() == _reference_phases(ids, mask[i].tolist())


def _operands(prompts: torch.Tensor, t: ArithmeticTask) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = [], []
    for row in prompts:
        text = decode(row)[:-1]
        op = next(c for c in "+-*" if c in text)
        x, z = text.split(op)
        a.append(int(x))
        b.append(int(z))
    return torch.tensor(a), torch.tensor(b)


def test_warm_start_batch_has_varied_scratch_and_is_correct_without_noise():
    t = ArithmeticTask(num_digits=1, scratch_tokens=8)
    x, y, m = t.supervised_batch(2000, noise=0.0, generator=torch.Generator().manual_seed(3))
    assert x.shape == y.shape == m.shape == (2000, t.prompt_length + t.max_new_tokens - 1)
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    p = t.prompt_length
    resp = y[:, p - 1 :]
    answers = t.result(*_operands(x[:, :p], t))
    assert t.reward(resp, answers).tolist() == [1.0] * 2000  # every noise-free target is a correct response
    # the loss mask covers exactly the response up to <eos>: scratch digits, "=", answer, <eos>
    assert torch.equal(m[:, p - 1 :], response_mask(resp) & (resp != PAD)) and not m[:, : p - 1].any()
    k = (resp == SEPARATOR).int().argmax(1)
    counts = torch.bincount(k, minlength=9)
    assert counts.shape == (9,) and bool((counts > 150).all())  # 0..8 scratch tokens, about uniform
    scratch = resp[torch.arange(resp.shape[1])[None, :] < k[:, None]]
    digit_counts = torch.bincount(scratch - 3, minlength=10)
    assert digit_counts.shape == (10,) and digit_counts.min() > 0.8 * digit_counts.float().mean()  # random digits
    # noise touches answer digits only, never the scratch length or the separator
    _, yn, _ = t.supervised_batch(2000, noise=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal((yn == SEPARATOR).int().argmax(1), (y == SEPARATOR).int().argmax(1))


def test_bad_scratch_tokens_raise_and_datamodule_passes_it():
    for bad in (-1, 1.5, True):
        with pytest.raises(EntrotrainError, match="scratch_tokens"):
            ArithmeticTask(scratch_tokens=bad)
    dm = ArithmeticDataModule(num_digits=1, scratch_tokens=4, prompts_per_batch=3, num_batches=1)
    assert dm.task.scratch_tokens == 4 and dm.task.max_new_tokens == 4 + 1 + 2 + 1
    batch = next(iter(dm.train_dataloader()))
    assert batch["prompt_ids"].shape == (3, 5)  # prompts unchanged


def test_grpo_returns_task_phases_and_summary_reports_them():
    torch.manual_seed(0)
    task = GRPOTask(
        n_layer=1, n_head=2, n_embd=32, block_size=12, group_size=4, ppo_epochs=1, num_mini_batches=1,
        sft_steps=20, sft_batch_size=16,
    )  # fmt: skip
    dm = ArithmeticDataModule(num_digits=1, scratch_tokens=4, prompts_per_batch=4, num_batches=2)
    cap = OutputsRecorder()
    quiet_trainer(max_epochs=1, max_steps=-1, deterministic=False, callbacks=[cap]).fit(task, dm)
    out = cap.outputs[-1]
    phases, mask = out["phase_ids"], out["response_mask"]
    assert phases.shape == mask.shape == (16, dm.task.max_new_tokens)
    assert torch.all(phases[~mask] == -1) and bool(((phases[mask] == 0) | (phases[mask] == 1)).all())
    summary = task.summary()
    assert "phase-0 length" in summary and "phase-1 entropy" in summary and len(task._phase_history) == 2
    think_len = float((phases == 0).sum()) / 16
    assert task._phase_history[-1][2] == pytest.approx(think_len)
