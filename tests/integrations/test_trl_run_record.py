"""Run records written from TRL by ``EntropyTrainerCallback(record=...)`` attached to a tiny ``EntrotrainGRPOTrainer``
(offline, CPU, seconds): the policy statistics and TRL's rewards at the logged steps, and the report's policy
section. TRL is an optional extra: skipped without it."""

from __future__ import annotations


import numpy as np
import pytest
import torch

pytest.importorskip("trl")

from entrotrain.dashboards.report import build_report  # noqa: E402
from entrotrain.dashboards.run_reader import load_run  # noqa: E402
from entrotrain.integrations.transformers import EntropyTrainerCallback  # noqa: E402
from tests.integrations.test_trl import EntrotrainGRPOTrainer, _train, _trainer  # noqa: E402

#: Keys Trainer/TRL log that the reader does not keep as scalars.
_NOT_SCALARS = {"epoch", "step"}


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """4 GRPO steps logged every 2 steps, with a record-only ``EntropyTrainerCallback`` attached."""
    tmp_path = tmp_path_factory.mktemp("trl_record")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = _trainer(EntrotrainGRPOTrainer, tmp_path / "out", max_steps=4, logging_steps=2, run_name="grpo-rec")
        cb = EntropyTrainerCallback(record=tmp_path / "runs").attach(trainer)
        _train(trainer)
    finally:
        torch.set_num_threads(threads)
    (run_dir,) = sorted((tmp_path / "runs" / "records").iterdir())
    return dict(trainer=trainer, cb=cb, run_dir=run_dir)


def _logged(trainer) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for row in trainer.state.log_history:
        numbers = {
            k: float(v) for k, v in row.items()
            if k not in _NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        out.setdefault(int(row["step"]), {}).update(numbers)
    return out


def test_trl_record_holds_the_policy_statistics_and_rewards_at_the_logged_steps(grpo_run: dict) -> None:
    """Every number TRL logged (``entropy/policy/*`` from EntrotrainGRPOTrainer, ``reward``, ``loss``, ...) is in the
    record at its step with its value; status finished; the model class and TRL's arguments as hyperparameters."""
    trainer, run = grpo_run["trainer"], load_run(grpo_run["run_dir"])
    logged = _logged(trainer)
    assert sorted(logged) == [2, 4]
    for key in ("entropy/policy/mean", "entropy/policy/cov_mean", "entropy/policy/reward_mean", "reward", "loss"):
        steps, values = run.scalars[key]
        assert steps.tolist() == [2, 4], key
        assert values.tolist() == [logged[2][key], logged[4][key]], key
    assert set(run.scalars) == set().union(*(row.keys() for row in logged.values()))
    for step, row in logged.items():
        for key, value in row.items():
            steps, values = run.scalars[key]
            assert values[steps.tolist().index(step)] == value, (key, step)
    assert run.status == "finished" and run.meta["name"] == "grpo-rec"
    assert run.hparams["model"] == "Qwen2ForCausalLM"
    assert run.hparams["training_args"]["num_generations"] == 4  # GRPOConfig's own fields are kept
    assert grpo_run["cb"].record is None


def test_trl_record_gives_the_reports_policy_section(grpo_run: dict) -> None:
    """``build_report`` on the TRL record draws the policy section with its findings (entropy and reward first → last,
    values from the record)."""
    run = load_run(grpo_run["run_dir"])
    html = build_report([grpo_run["run_dir"]], grpo_run["run_dir"].parent / "report").read_text()
    assert 'id="policy"' in html and "Policy entropy" in html
    assert "Policy entropy went from" in html and "Reward went from" in html
    first, last = run.first_last("entropy/policy/mean")
    assert first != last  # the finding compares two different logged values


def test_trl_record_holds_the_policy_entropy_histogram(grpo_run: dict) -> None:
    """As a Lightning PolicyEntropyMonitor run: ``entropy/policy/hist`` (kind histogram) at each logged step, holding
    the step's valid token entropies (as many as ``entropy/policy/tokens``)."""
    run = load_run(grpo_run["run_dir"])
    items = run.media.get("entropy/policy/hist", [])
    assert [(m.step, m.kind) for m in items] == [(2, "histogram"), (4, "histogram")]
    logged = _logged(grpo_run["trainer"])
    for item in items:
        values = item.load()
        assert values.size == logged[item.step]["entropy/policy/tokens"]
        assert np.quantile(values, 0.5) == pytest.approx(logged[item.step]["entropy/policy/p50"], rel=1e-6)
