from __future__ import annotations

import pytest
import torch

from entrotrain.errors import EntrotrainError
from entrotrain.tasks.arithmetic import (
    BOS,
    EOS,
    PAD,
    VOCAB_SIZE,
    ArithmeticDataModule,
    ArithmeticTask,
    decode,
    encode,
)


def _resp(text: str, length: int, eos: bool = True) -> list[int]:
    ids = encode(text) + ([EOS] if eos else [])
    return (ids + [PAD] * length)[:length]


def test_vocab_and_roundtrip():
    assert VOCAB_SIZE == 17
    assert decode(encode("12+34=")) == "12+34="
    assert decode([BOS, *encode("7"), EOS, *encode("9")]) == "7"
    assert decode([*encode("7"), EOS, *encode("9")], stop_at_eos=False) == "79"
    with pytest.raises(EntrotrainError, match="vocabulary"):
        encode("1/2")


def test_prompts_fixed_length_zero_padded():
    t = ArithmeticTask(num_digits=2)
    p = t.encode_prompts(torch.tensor([7, 45]), torch.tensor([3, 99]))
    assert p.shape == (2, t.prompt_length) == (2, 7)
    assert p[:, 0].tolist() == [BOS, BOS]
    assert decode(p[0]) == "07+03=" and decode(p[1]) == "45+99="
    assert ArithmeticTask(3, "mul").max_new_tokens == 7 and ArithmeticTask(3, "add").max_new_tokens == 5


@pytest.mark.parametrize(
    "op,a,b,expected",
    [("add", 45, 99, 144), ("add", 0, 0, 0), ("sub", 45, 9, 36), ("mul", 12, 34, 408), ("mul", 99, 99, 9801)],
)
def test_reward_exact_on_hand_cases(op, a, b, expected):
    t = ArithmeticTask(num_digits=2, operation=op)
    assert int(t.result(torch.tensor([a]), torch.tensor([b]))) == expected
    R = t.max_new_tokens
    ans = torch.tensor([expected])
    right = str(expected)
    cases = [
        (_resp(right, R), 1.0),
        (_resp(str(expected + 1), R), 0.0),
        (_resp(right, R, eos=False), 0.0),  # no <eos>: not an answer
        (_resp("0" + right, R), 0.0),  # a leading zero is not the answer
        (_resp(right[:-1], R), 0.0),  # truncated
        (_resp(right + "1", R), 0.0),  # extra digit
    ]
    for ids, reward in cases:
        got = t.reward(torch.tensor([ids]), ans)
        assert got.tolist() == [reward], (decode(ids, stop_at_eos=False), got)
    # anything after <eos> is ignored
    tail = _resp(right, R)
    if len(right) + 1 < R:
        tail[len(right) + 1] = encode("5")[0]
        assert t.reward(torch.tensor([tail]), ans).tolist() == [1.0]


def test_reward_reversed_answers():
    t = ArithmeticTask(num_digits=2, reverse_answer=True)
    R = t.max_new_tokens
    ans = torch.tensor([144, 30])
    got = t.reward(torch.tensor([_resp("441", R), _resp("03", R)]), ans)
    assert got.tolist() == [1.0, 1.0]
    assert t.reward(torch.tensor([_resp("144", R), _resp("3", R)]), ans).tolist() == [0.0, 0.0]


def test_reward_matches_string_check_on_random_responses():
    g = torch.Generator().manual_seed(0)
    for op, rev in (("add", False), ("mul", True), ("sub", False)):
        t = ArithmeticTask(num_digits=2, operation=op, reverse_answer=rev)
        _, answers = t.sample(400, g)
        target, _ = t.answer_tokens(answers)
        noise = torch.randint(3, 13, target.shape, generator=g)
        flip = torch.rand(target.shape, generator=g) < 0.15
        resp = torch.where(flip, noise, target)
        resp[torch.rand(target.shape, generator=g) < 0.05] = EOS
        got = t.reward(resp, answers)
        for i in range(len(answers)):
            ids = resp[i].tolist()
            text = str(int(answers[i]))
            text = text[::-1] if rev else text
            ok = EOS in ids and decode(ids) == text
            assert got[i].item() == float(ok)
        assert 0 < got.mean() < 1


def test_supervised_batch_masks_answer_only_and_noise():
    t = ArithmeticTask(num_digits=2)
    x, y, m = t.supervised_batch(64, noise=0.0, generator=torch.Generator().manual_seed(1))
    assert x.shape == y.shape == m.shape == (64, t.prompt_length + t.max_new_tokens - 1)
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    for i in range(64):
        prompt = decode(x[i, : t.prompt_length])
        a, b = prompt[:-1].split("+")
        assert decode(y[i][m[i]]) == str(int(a) + int(b))
        assert y[i][m[i]][-1] == EOS and not m[i, : t.prompt_length - 1].any()
    _, yn, mn = t.supervised_batch(2000, noise=0.5, generator=torch.Generator().manual_seed(1))
    _, y0, _ = t.supervised_batch(2000, noise=0.0, generator=torch.Generator().manual_seed(1))
    digits = mn & (y0 != EOS)
    changed = (yn != y0)[digits].float().mean()
    assert 0.4 < changed < 0.5  # 0.5 * 9/10


def test_datamodule_batches_deterministic():
    dm = ArithmeticDataModule(num_digits=1, prompts_per_batch=5, num_batches=3, seed=2)
    batches = list(dm.train_dataloader())
    assert len(batches) == 3 and batches[0]["prompt_ids"].shape == (5, 5)
    again = list(ArithmeticDataModule(num_digits=1, prompts_per_batch=5, num_batches=3, seed=2).train_dataloader())
    assert all(torch.equal(p["prompt_ids"], q["prompt_ids"]) for p, q in zip(batches, again))
    for bt in batches:
        for ids, ans in zip(bt["prompt_ids"], bt["answers"]):
            a, b = decode(ids)[:-1].split("+")
            assert int(a) + int(b) == int(ans)


def test_bad_arguments_raise():
    with pytest.raises(EntrotrainError, match="operation"):
        ArithmeticTask(operation="div")
    with pytest.raises(EntrotrainError, match="num_digits"):
        ArithmeticTask(num_digits=0)
    with pytest.raises(EntrotrainError, match="noise"):
        ArithmeticTask().supervised_batch(2, noise=1.5)
    with pytest.raises(EntrotrainError, match="response_ids"):
        ArithmeticTask().reward(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(EntrotrainError, match="prompts_per_batch"):
        ArithmeticDataModule(prompts_per_batch=0)
