"""Guards in a plain loop on 2 gloo ranks judge one value agreed on by the ranks (MonitorSession.agree): each rank
hands over its own value with ``monitors.observe``, and every rank rolls back, stops or lowers its rates alike
(tests/integrations/guard_ranks_ddp_run.py). Before, each rank judged its own value: one rank rolled back alone and
the replicas' weights parted, one rank stopped alone (the other would wait for it in its next collective). A state
that is non-finite on one rank only (a buffer) is held on no rank, so both roll back to the same step. A rank that
hands the policy monitor nothing at a logging step is an error on every rank, not a hang in the gather."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from entrotrain.integrations._monitor_session import agreed_value
from tests.helpers.scripts import run_script


def test_ranks_with_different_observed_values_decide_alike(tmp_path: Path) -> None:
    run_script(Path(__file__).with_name("guard_ranks_ddp_run.py"), Path(__file__).resolve().parents[2], str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for name in ("rollback", "stop", "reduce_lr", "rollback_buffer"):
        assert ranks[0][name]["weights"] == ranks[1][name]["weights"], name  # the replicas stay one model
    for r in ranks:
        assert r["rollback"]["rolled"] == [2], r["rollback"]  # rank 1's bad value rolls both back
        # rank 1's state after step 2 held a NaN buffer: held on neither rank, both roll back to step 1's state
        buffer = r["rollback_buffer"]
        assert buffer["rolled"] == [3] and buffer["restored_to"] == [1], buffer
        # a frozen parameter changed on rank 1 only (hold='trainable'): the take refuses on both ranks, at step 1;
        # changed at the bad step, the restore refuses on both (no rollback, both stop)
        assert r["frozen_take"]["step"] == 1 and "error" in r["frozen_take"], r["frozen_take"]
        assert r["frozen_restore"]["rolled"] == [] and r["frozen_restore"]["stop"][-1], r["frozen_restore"]
        assert r["stop"]["stop"] == [False, True, True, True]  # rank 1's NaN stops both
        assert r["reduce_lr"]["lr"] == 0.05  # only rank 0 handed a value over: it counts on both, no hang
        # a rank that hands the policy monitor nothing (or no rewards) is an error on both ranks, not a hang
        assert "rank(s) [0] handed tensors over with record_policy() and the others did not" in r["policy_missing"][
            "error"], r["policy_missing"]
        assert "rank(s) [0] handed rewards= over" in r["policy_rewards"]["error"], r["policy_rewards"]
        assert r["policy_empty"]["logs"]["entropy/policy/mean"] > 0  # empty (0, T) tensors join the gather
        assert r["policy_dtypes"]["logs"]["entropy/policy/mean"] > 0  # float32 beside float64: promoted, as cat does
    assert ranks[0]["policy_empty"] == ranks[1]["policy_empty"]
    assert ranks[0]["policy_dtypes"] == ranks[1]["policy_dtypes"]
    assert "another process of this run could not hold the state of step 1" in ranks[0]["frozen_take"]["error"]
    assert "another process" not in ranks[1]["frozen_take"]["error"]  # rank 1 says its own reason
    # each take of a held state agrees on everything in one all-reduce: the host memory check, the frozen parameters'
    # check (hold='trainable') and whether the state is finite (before: one each, 2 or 3 per take)
    for name in ("rollback", "rollback_buffer", "frozen_take", "frozen_restore"):
        for r in ranks:
            assert r[name]["takes"] > 0 and r[name]["collectives"] == ["all_reduce"] * r[name]["takes"], (name, r[name])


@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=4), st.sampled_from(["min", "max"]))
def test_the_agreed_value_is_a_rank_s_own_and_a_bad_one_wins(given_values: list[float], mode: str) -> None:
    agreed = agreed_value(given_values, mode)
    if not given_values:
        assert agreed is None
        return
    bad = [v for v in given_values if not math.isfinite(v)]
    if bad:  # any rank's NaN / Inf: every rank judges the first of them
        assert agreed is bad[0]
    else:  # the worst rank's value, exactly as that rank handed it over
        assert agreed in given_values
        assert all(agreed <= v if mode == "min" else agreed >= v for v in given_values)


@given(st.floats(allow_nan=False), st.integers(1, 8), st.sampled_from(["min", "max"]))
def test_a_value_the_same_on_every_rank_is_judged_bit_for_bit(value: float, world: int, mode: str) -> None:
    assert struct.pack("<d", agreed_value([value] * world, mode)) == struct.pack("<d", value)


def test_the_ranks_exchange_values_only_for_guards_on_keys_no_monitor_publishes(monkeypatch) -> None:
    """One all_gather per step for a guard on an observed key; none for a guard on a monitor's key, also at the
    steps where the monitor does not log (its value is reduced where it is published). Two ranks faked in one
    process (an initialised default group of 2 whose collectives hand back this rank's part): the other rank handed
    over what this one did."""
    import torch

    from entrotrain.callbacks.attention_monitor import AttentionEntropyMonitor
    from entrotrain.callbacks.collapse_guard import EntropyCollapseGuard
    from entrotrain.integrations.loop import EntropyMonitors
    from tests.helpers.gpt_module import GPTModule
    from tests.helpers.loop_runs import token_batches

    calls: list[int] = []

    def all_gather(parts, sent) -> None:
        calls.append(step)
        for part in parts:
            part.copy_(sent)

    def all_gather_object(parts, obj) -> None:
        parts[:] = [obj] * len(parts)

    dist = torch.distributed
    for name, stub in (("is_initialized", lambda: True), ("get_world_size", lambda group=None: 2),
                       ("get_rank", lambda group=None: 0), ("get_backend", lambda group=None: "gloo"),
                       ("all_gather", all_gather), ("all_gather_object", all_gather_object),
                       ("all_reduce", lambda t, op=None, group=None: t.mul_(2))):  # the sum of 2 ranks alike
        monkeypatch.setattr(dist, name, stub)
    for key, expected in (("entropy/attn_norm/min", []), ("loss", [0, 1, 2, 3])):
        calls.clear()
        module = GPTModule(seed=0, convert=False)
        guard = EntropyCollapseGuard(key, threshold=-1.0, keep_last_good=False)
        monitors = EntropyMonitors([AttentionEntropyMonitor(every_n_steps=2, log_media=False)], guards=[guard],
                                   print_summary=False)
        with monitors.watch(module):
            for step, (batch,) in enumerate(token_batches(4)):
                with monitors.step(step):
                    loss = module.training_step((batch,), step)
                    monitors.observe(loss=loss)
        assert calls == expected, key
        assert guard.last_seen_step == (2 if key != "loss" else 3)  # judged where published / handed over
