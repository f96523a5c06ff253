"""Review of session 28's rollback, inspect and guard changes: each test failed before its fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from entrotrain.callbacks import EntropyCollapseGuard
from entrotrain.callbacks import rollback_memory
from entrotrain.callbacks.rollback_memory import state_bytes
from entrotrain.errors import EntrotrainError


def test_a_held_state_that_grows_once_the_ring_is_full_is_checked_against_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # rollback_states=1: the ring is full after the first take; Adam's moments appearing later triple the state
    # (so would a backbone unfrozen by BackboneFinetuning): the module docstring says that growth is checked too.
    model = nn.Linear(100, 100)
    optimizer = torch.optim.Adam(model.parameters())
    guard = EntropyCollapseGuard("k", threshold=0.5, action="rollback", keep_last_good=False)
    guard.track(model, [optimizer])
    weights = state_bytes(model, [optimizer])
    monkeypatch.setattr(rollback_memory, "host_bytes_available", lambda: 2 * weights)
    guard.observe(0.9, 0)  # the weights alone: fits
    model(torch.randn(2, 100)).sum().backward()
    optimizer.step()
    with pytest.raises(EntrotrainError, match=r"would hold 1 state\(s\) of .*rollback_states"):
        guard.observe(0.9, 1)


def test_two_copies_of_one_save_with_non_finite_weights_count_once(tmp_path) -> None:
    # The checkpoints of a collapse are what inspect is for, and they can hold a NaN: equal copies of one save (two
    # ModelCheckpoint callbacks) are one checkpoint, not 'checkpoints of several runs' (NaN != NaN).
    from entrotrain.integrations.checkpoint_sources import find_checkpoints

    weights = {"w": torch.tensor([1.0, float("nan"), float("inf")])}
    for name in ("epoch=0-step=5.ckpt", "epoch=0-step=5-v1.ckpt"):
        torch.save({"state_dict": weights, "global_step": 5}, tmp_path / name)
    assert [c.path.name for c in find_checkpoints([tmp_path])] == ["epoch=0-step=5.ckpt"]
    torch.save({"state_dict": {"w": torch.tensor([1.0, 2.0, float("inf")])}}, tmp_path / "epoch=0-step=5-v1.ckpt")
    with pytest.raises(EntrotrainError, match="several runs"):  # a NaN where the other has a number: different
        find_checkpoints([tmp_path])


def test_a_key_absent_from_one_publication_is_no_typo_of_a_longer_sibling() -> None:
    # PolicyEntropyMonitor's first batch with no valid token publishes no 'mean' but 'reward_mean': the guard's key
    # was called a typo and the warning told the user to guard the reward. A typo is close in its last part.
    from entrotrain.callbacks._guard_keys import misspelt_key

    first = {"entropy/policy/nonfinite", "entropy/policy/tokens", "entropy/policy/reward_mean"}
    assert misspelt_key("entropy/policy/mean", first) is None
    assert misspelt_key("entropy/attn_norm/p05", {"entropy/attn_norm/max", "entropy/attn_norm/min"}) is None
    assert misspelt_key("entropy/attn_norm/mean", {"entropy/attn_norm/min"}) is None
    assert misspelt_key("entropy/policy/mena", first | {"entropy/policy/mean"}) == "entropy/policy/mean"
    assert misspelt_key("entropy/attn_norm/mni", {"entropy/attn_norm/min"}) == "entropy/attn_norm/min"


def _cgroup(folder, limit: str, used: int, inactive: int, names=("memory.max", "memory.current", "inactive_file")):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / names[0]).write_text(limit + "\n")
    (folder / names[1]).write_text(f"{used}\n")
    (folder / "memory.stat").write_text(f"anon 5\n{names[2]} {inactive}\n")


@pytest.mark.parametrize("version", [2, 1])
def test_the_memory_available_is_the_least_under_a_container_or_job_limit(tmp_path, monkeypatch, version) -> None:
    # In a Kubernetes pod or a SLURM job the OOM killer acts at the control group's limit, not when the machine's
    # MemAvailable runs out: the check compared the held states with the whole machine's free memory.
    gib = 1 << 30
    monkeypatch.setattr(rollback_memory, "_machine_available", lambda: 500 * gib, raising=False)
    monkeypatch.setattr(rollback_memory, "_CGROUP_ROOT", tmp_path, raising=False)
    proc = tmp_path / "self_cgroup"
    monkeypatch.setattr(rollback_memory, "_PROC_CGROUP", proc, raising=False)
    if version == 2:
        proc.write_text("0::/kubepods/pod1/ctr\n")
        _cgroup(tmp_path / "kubepods/pod1", str(8 * gib), 5 * gib, 1 * gib)  # 4 GiB left, page cache counted free
        _cgroup(tmp_path / "kubepods/pod1/ctr", "max", 5 * gib, gib)
    else:
        proc.write_text("5:cpu,cpuacct:/job\n4:memory:/slurm/job_7\n")
        v1 = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        _cgroup(tmp_path / "memory/slurm/job_7", str(6 * gib), 3 * gib, 0, v1)  # 3 GiB left
        _cgroup(tmp_path / "memory", str((1 << 63) - 4096), 9 * gib, 0, v1)  # unlimited
    assert rollback_memory.host_bytes_available() == (4 if version == 2 else 3) * gib
    proc.write_text("0::/\n")  # no limit anywhere: the machine's
    assert rollback_memory.host_bytes_available() == 500 * gib


def test_hold_trainable_holds_an_averaged_copy_whose_parameters_are_frozen() -> None:
    # The usual hand-written EMA is `copy.deepcopy(model).requires_grad_(False)` updated under no_grad; passed as
    # averaged=, hold='trainable' fingerprinted it as a frozen base and refused the next observation ('changed').
    import copy

    model = nn.Linear(4, 4)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = EntropyCollapseGuard("k", threshold=0.5, action="rollback", keep_last_good=False, hold="trainable",
                                 patience=1)
    guard.track(model, [optimizer], averaged=[ema])

    def step() -> None:
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 0.5)

    guard.observe(0.9, 0)
    step()
    guard.observe(0.9, 1)  # the EMA moved: held, not refused
    held = [t.clone() for t in (*model.parameters(), *ema.parameters())]
    step()
    assert guard.observe(0.1, 2) is not None
    assert "to step 1" in guard._roll_back([optimizer], [])
    assert all(torch.equal(a, b) for a, b in zip(held, (*model.parameters(), *ema.parameters())))


def test_a_float8_tensor_with_a_nan_is_not_held_and_raises_nothing() -> None:
    # A float8 buffer (a quantized layer's scale or weight) with a NaN: the sum sees it, then the element-wise look
    # raised torch's raw NotImplementedError ('"isfinite" not implemented for Float8_e4m3fn').
    from entrotrain.callbacks.rollback_state import RollbackState

    model = nn.Linear(2, 2)
    model.register_buffer("q", torch.tensor([1.0, 2.0]).to(torch.float8_e4m3fn))
    assert RollbackState().take(model, [], step=0)
    model.q[1] = float("nan")
    assert not RollbackState().take(model, [], step=1)


def test_hold_trainable_fingerprints_a_frozen_float8_parameter() -> None:
    # An FP8 base under LoRA: 3b0db08 fingerprints frozen parameters of any dtype, but float8's norm raised torch's
    # raw 'Promotion for Float8 Types is not supported'.
    model = nn.Linear(2, 2)
    model.weight = nn.Parameter(model.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    guard = EntropyCollapseGuard("k", threshold=0.5, action="rollback", keep_last_good=False, hold="trainable")
    guard.track(model, [torch.optim.SGD([model.bias], lr=0.1)])
    guard.observe(0.9, 0)
    guard.observe(0.9, 1)
    assert guard.held_states.steps == [1]


def test_the_runs_table_names_a_run_given_as_the_current_folder(tmp_path, monkeypatch) -> None:
    # `entrotrain status . ../b` from inside a run record folder: the table names each record's folder (0cce865),
    # and Path('.').name is '': the row had no name.
    from entrotrain.dashboards.run_reader import load_run
    from entrotrain.dashboards.run_record import RunRecordLogger
    from entrotrain.dashboards.terminal_status import runs_table

    for name in ("a", "b"):
        record = RunRecordLogger(tmp_path, version=name, run_name=name)
        record.log_metrics({"entropy/attn_norm/min": 0.5}, step=0)
        record.finalize("success")
    monkeypatch.chdir(tmp_path / "records/a")
    rows = runs_table([load_run("."), load_run("../b")])
    assert [row.split()[0] for row in rows[1:]] == ["a", "b"]


def test_two_copies_of_one_save_with_a_non_tensor_entry_count_once(tmp_path) -> None:
    # A module's extra state (get_extra_state: e.g. a quantizer's config) is a non-tensor state_dict entry: equal
    # copies were 'checkpoints of several runs' (only tensors could compare equal).
    from entrotrain.integrations.checkpoint_sources import find_checkpoints

    for name in ("epoch=0-step=5.ckpt", "epoch=0-step=5-v1.ckpt"):
        torch.save({"state_dict": {"w": torch.ones(2), "q._extra_state": {"bits": 4}}}, tmp_path / name)
    assert [c.path.name for c in find_checkpoints([tmp_path])] == ["epoch=0-step=5.ckpt"]
    torch.save({"state_dict": {"w": torch.ones(2), "q._extra_state": {"bits": 8}}}, tmp_path / "epoch=0-step=5-v1.ckpt")
    with pytest.raises(EntrotrainError, match="several runs"):
        find_checkpoints([tmp_path])


def test_one_held_state_counts_the_parameters_stepped_outside_the_model() -> None:
    # 6f85a40 holds a parameter an optimizer steps outside the model (a discriminator when the generator is watched),
    # but the memory check left it out of a held state's bytes: a discriminator as large as the model, half counted.
    model = nn.Linear(10, 10)
    outside = nn.Parameter(torch.zeros(1000, 100))
    optimizer = torch.optim.SGD([*model.parameters(), outside], lr=0.1)
    assert state_bytes(model, [optimizer]) == (110 + 100_000) * 4
