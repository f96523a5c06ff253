"""EntrotrainGRPOTrainer: TRL parity bit for bit, monitoring changes nothing, the Lightning monitor's keys and values.

TRL is an optional extra: the whole module is skipped without it. Every run is a tiny Qwen2 on CPU (seconds).
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, set_seed  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer  # noqa: E402

from entrotrain.callbacks.policy_monitor import PolicyEntropyMonitor  # noqa: E402
from entrotrain.errors import EntrotrainError  # noqa: E402
from entrotrain.integrations._trl_stats import PolicyStatsTrainerMixin  # noqa: E402
from entrotrain.integrations.policy_stats import PolicyStatsRecorder  # noqa: E402
from entrotrain.integrations.trl import (  # noqa: E402
    SUPPORTED_TRL,
    EntrotrainGRPOTrainer,
    check_trl_version,
    trl_grpo_loss,
)
from entrotrain.regularizers.policy_loss import (  # noqa: E402
    ClipCovLoss,
    EntropyBonus,
    KLCovLoss,
    PPOClipLoss,
    SteerLoss,
)
from tests.helpers.policy_batches import ReturnsBatches, loader, rl_batch  # noqa: E402
from tests.helpers.lightning_models import quiet_trainer  # noqa: E402
from tests.helpers.spy_logger import SpyLogger  # noqa: E402

CHARS = "0123456789+="


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left")


TOKENIZER = _tokenizer()


def _model(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, eos_token_id=1, bos_token_id=1,
        tie_word_embeddings=True,
    )  # fmt: skip
    return Qwen2ForCausalLM(cfg)


def _reward(completions, prompts, **kwargs):
    return [float(c.strip()[:1] == str(int(p[0]) + int(p[2]))) + 0.1 * len(c) for p, c in zip(prompts, completions)]


DATA = Dataset.from_dict({"prompt": [f"{i % 4}+{(i // 4) % 4}=" for i in range(64)]})


def _args(tmp_path, config: type = GRPOConfig, **kw) -> GRPOConfig:
    """GRPOConfig (or RLOOConfig: test_trl_rloo.py) for a tiny CPU run."""
    base = dict(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", num_generations=4,
        max_completion_length=6, per_device_train_batch_size=8, max_steps=2, logging_steps=1, learning_rate=1e-2,
        save_strategy="no", seed=0, disable_tqdm=True, beta=0.0,
    )  # fmt: skip
    base.update(kw)
    return config(**base)


def _trainer(cls, tmp_path, model=None, **kw):
    """A TRL trainer (GRPO, or RLOO for an ``RLOOTrainer`` class) on the tiny model, tokenizer, reward and data."""
    extra = {k: kw.pop(k) for k in list(kw) if k in (
        "policy_loss", "policy_stats", "stats_agg", "print_summary", "fit_min_points"
    )}  # fmt: skip
    if issubclass(cls, PolicyStatsTrainerMixin):
        extra.setdefault("print_summary", False)
    config = RLOOConfig if issubclass(cls, RLOOTrainer) else GRPOConfig
    return cls(
        model=model if model is not None else _model(), reward_funcs=_reward, args=_args(tmp_path, config, **kw),
        train_dataset=DATA, processing_class=TOKENIZER, **extra,
    )  # fmt: skip


def _train(trainer) -> None:
    """Train from the same RNG state (the trainers' construction and earlier runs consumed the global RNG)."""
    set_seed(0)
    trainer.train()


def _inputs(seed: int = 0, b: int = 8, p: int = 4, t: int = 6) -> dict:
    """A hand-made micro-batch: ragged completions (>= 1 token each), off-policy old log-probs (both clip sides)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    completion_mask = (torch.arange(t)[None] < lengths[:, None]).long()
    return {
        "prompt_ids": torch.randint(2, len(TOKENIZER), (b, p), generator=g),
        "prompt_mask": torch.ones(b, p, dtype=torch.long),
        "completion_ids": torch.randint(1, len(TOKENIZER), (b, t), generator=g) * completion_mask,
        "completion_mask": completion_mask,
        "advantages": torch.randn(b, generator=g),
        "old_noise": torch.randn(b, t, generator=g) * 0.4,
        "num_items_in_batch": completion_mask.sum(),
    }


def _with_old_logps(trainer, inputs: dict) -> dict:
    """``old_per_token_logps`` = the current log-probs + noise, so the ratio leaves [1-eps, 1+eps] on both sides."""
    inputs = dict(inputs)
    noise = inputs.pop("old_noise")
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        logps, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, ids, mask, inputs["completion_ids"].shape[1]
        )
    inputs["old_per_token_logps"] = logps + noise
    return inputs


def _loss_and_grads(trainer, inputs: dict):
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------------------------- packaging


def test_import_entrotrain_does_not_import_trl():
    code = (
        "import importlib.util, sys, entrotrain, entrotrain.integrations, entrotrain.regularizers\n"
        "assert importlib.util.find_spec('trl') is not None  # installed, so its absence below means something\n"
        "bad = [m for m in ('trl', 'verl') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("version", ["1.16.0", "1.16.7", "1.16.0rc1"])
def test_supported_versions_pass(version):
    assert check_trl_version(version) == version


@pytest.mark.parametrize("version", ["1.15.2", "1.17.0", "2.0.0", "0.16.1", "not-a-version"])
def test_other_versions_are_refused_naming_the_range(version):
    with pytest.raises(EntrotrainError, match=r"trl>=1\.16,<1\.17") as err:
        check_trl_version(version)
    assert repr(version) in str(err.value)
    assert SUPPORTED_TRL == ">=1.16,<1.17"


def test_trainer_refuses_an_unsupported_installed_trl(tmp_path, monkeypatch):
    import trl

    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(EntrotrainError, match="1.17.0"):
        _trainer(EntrotrainGRPOTrainer, tmp_path)


# --------------------------------------------------------------------------------------------- parity with TRL


@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.2, 0.28)])
def test_plain_clipped_loss_equals_trl_grpo_bit_for_bit(tmp_path, eps):
    model = _model()
    trl_side = _trainer(GRPOTrainer, tmp_path / "a", model=copy.deepcopy(model), loss_type="grpo", epsilon=eps[0],
                        epsilon_high=eps[1])
    ours = _trainer(EntrotrainGRPOTrainer, tmp_path / "b", model=copy.deepcopy(model), loss_type="grpo",
                    epsilon=eps[0], epsilon_high=eps[1], policy_loss=trl_grpo_loss(*eps))
    for seed in (0, 1):
        inputs = _with_old_logps(trl_side, _inputs(seed))
        ratio = torch.exp(
            GRPOTrainer._get_per_token_logps_and_entropies(
                trl_side, trl_side.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
                torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), inputs["completion_ids"].shape[1],
            )[0].detach() - inputs["old_per_token_logps"]
        )[inputs["completion_mask"].bool()]  # fmt: skip
        assert (ratio < 1 - eps[0]).any() and (ratio > 1 + eps[1]).any()  # both clip branches are exercised
        loss_a, grads_a = _loss_and_grads(trl_side, inputs)
        loss_b, grads_b = _loss_and_grads(ours, inputs)
        assert torch.equal(loss_a, loss_b)
        assert grads_a.keys() == grads_b.keys() and grads_a
        for name in grads_a:
            assert torch.equal(grads_a[name], grads_b[name]), name
    # the comparison can fail: another clip range gives another loss
    other = _trainer(EntrotrainGRPOTrainer, tmp_path / "c", model=copy.deepcopy(model), loss_type="grpo",
                     policy_loss=trl_grpo_loss(0.05, 0.05))
    assert not torch.equal(_loss_and_grads(other, inputs)[0], loss_a)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_training_steps_equal_trl_grpo_bit_for_bit(tmp_path, accumulation):
    model = _model()
    kw = dict(loss_type="grpo", max_steps=2, gradient_accumulation_steps=accumulation)
    a = _trainer(GRPOTrainer, tmp_path / "a", model=copy.deepcopy(model), **kw)
    b = _trainer(EntrotrainGRPOTrainer, tmp_path / "b", model=copy.deepcopy(model), **kw,
                 policy_loss=trl_grpo_loss(a.epsilon_low, a.epsilon_high))
    _train(a)
    _train(b)
    for (name, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(p, q) for p, q in zip(a.model.parameters(), model.parameters()))  # it trained


# --------------------------------------------------------------------------------------------- monitoring


def test_statistics_change_nothing_and_are_logged_on_logging_steps(tmp_path):
    model = _model()
    plain = _trainer(GRPOTrainer, tmp_path / "a", model=copy.deepcopy(model), max_steps=3, logging_steps=2)
    watched = _trainer(EntrotrainGRPOTrainer, tmp_path / "b", model=copy.deepcopy(model), max_steps=3,
                       logging_steps=2)
    added = []
    original = watched.policy_stats.add
    watched.policy_stats.add = lambda *a, **k: (added.append(watched.state.global_step), original(*a, **k))[1]
    _train(plain)
    _train(watched)
    for (name, pa), (_, pb) in zip(plain.model.named_parameters(), watched.model.named_parameters()):
        assert torch.equal(pa, pb), name
    rows_a = [r for r in plain.state.log_history if "loss" in r]
    rows_b = [r for r in watched.state.log_history if "loss" in r]
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    assert [r["step"] for r in rows_b] == [2]
    assert all("entropy/policy/mean" in r and "entropy/policy/cov_mean" in r for r in rows_b)
    assert added == [1]  # captured only on the optimizer step that logs (global_step 1 while step 2 runs)


def test_captured_tensors_are_trls(tmp_path):
    """token-mean entropy = TRL's own `entropy` metric; reward mean = TRL's `reward` (one micro-batch per step)."""
    t = _trainer(EntrotrainGRPOTrainer, tmp_path, max_steps=2, stats_agg="token-mean")
    _train(t)
    rows = [r for r in t.state.log_history if "loss" in r]
    assert len(rows) == 2
    for r in rows:
        assert r["entropy/policy/mean"] == pytest.approx(r["entropy"], rel=1e-5)
        assert r["entropy/policy/reward_mean"] == pytest.approx(r["reward"], rel=1e-5)
        assert r["entropy/policy/temperature"] == t.temperature
    assert "delta" in "".join(rows[-1]) and "step" in t.policy_stats_table()


def test_same_statistic_same_key_and_value_as_the_lightning_monitor():
    batches = [rl_batch(s) for s in range(7)]
    spy = SpyLogger()
    monitor = PolicyEntropyMonitor(fit_min_points=3, print_summary=False, log_media=False)
    trainer = quiet_trainer(max_steps=len(batches), callbacks=[monitor], logger=spy)
    trainer.fit(ReturnsBatches(batches), loader(len(batches)))
    lightning_rows = [row for _, row in spy.rows if "entropy/policy/mean" in row]

    stats = PolicyStatsRecorder(fit_min_points=3)
    trl_rows = []
    for i, b in enumerate(batches):
        half = b["token_entropy"].shape[0] // 2  # two micro-batches per step: statistics on their union
        for rows in (slice(0, half), slice(half, None)):
            stats.add(
                b["token_entropy"][rows], b["logprobs"][rows], b["advantages"][rows], b["response_mask"][rows],
                rewards=b["rewards"][rows], temperature=b["temperature"],
            )  # fmt: skip
        trl_rows.append(stats.compute(i))
    assert len(lightning_rows) == len(trl_rows) == len(batches)
    assert "entropy/policy/fit_ceiling" in trl_rows[-1] and "entropy/policy/delta_predicted" in trl_rows[-1]
    for ours, theirs in zip(trl_rows, lightning_rows):
        theirs = {k: v for k, v in theirs.items() if k.startswith("entropy/policy/")}
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key] == pytest.approx(theirs[key], rel=1e-12, abs=1e-15), key  # the logger holds float32?


def test_statistics_skip_nonfinite_tokens_and_never_log_nan():
    stats = PolicyStatsRecorder()
    b = rl_batch(3)
    h = b["token_entropy"].clone()
    h[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="NaN/Inf"):
        stats.add(h, b["logprobs"], b["advantages"], b["response_mask"], rewards=b["rewards"])
        row = stats.compute(0)
    assert row["entropy/policy/nonfinite"] == 1.0
    assert all(v == v for v in row.values())
    stats.add(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.zeros(2, 3, dtype=torch.bool))
    with pytest.warns(UserWarning, match="no valid"):
        row = stats.compute(1)
    assert "entropy/policy/mean" not in row and row["entropy/policy/tokens"] == 0.0


# --------------------------------------------------------------------------------------------- entrotrain losses


@pytest.mark.parametrize(
    "loss",
    [
        ClipCovLoss(clip_ratio=0.2, cov_lb=-10.0, cov_ub=10.0, agg="seq-mean-token-mean"),
        KLCovLoss(k_ratio=0.2, agg="seq-mean-token-mean"),
        SteerLoss(),
        PPOClipLoss() + EntropyBonus(0.01),
    ],
    ids=["clip_cov", "kl_cov", "steer", "ppo+bonus"],
)
def test_entrotrain_losses_train_through_trl(tmp_path, loss):
    t = _trainer(EntrotrainGRPOTrainer, tmp_path, policy_loss=loss, max_steps=2, num_iterations=2)
    _train(t)
    rows = [r for r in t.state.log_history if "loss" in r]
    assert all(r["policy/pg_loss"] == r["policy/pg_loss"] for r in rows if "policy/pg_loss" in r)
    assert any(k.startswith("policy/") for k in rows[-1]) and "entropy/policy/mean" in rows[-1]
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_clip_cov_drops_the_selected_tokens_gradient(tmp_path):
    """Clip-Cov selecting every candidate changes the gradient of the grpo loss; selecting none keeps it."""
    model = _model()
    base = _trainer(EntrotrainGRPOTrainer, tmp_path / "a", model=copy.deepcopy(model), policy_loss=trl_grpo_loss())
    inputs = _with_old_logps(base, _inputs(4))
    _, g0 = _loss_and_grads(base, inputs)
    none = ClipCovLoss(clip_ratio=1.0, cov_lb=1e8, cov_ub=1e9, agg="seq-mean-token-mean", mode="micro_batch",
                       min_selected=0)
    all_ = ClipCovLoss(clip_ratio=1.0, cov_lb=-1e9, cov_ub=1e9, agg="seq-mean-token-mean", mode="micro_batch")
    t_none = _trainer(EntrotrainGRPOTrainer, tmp_path / "b", model=copy.deepcopy(model), policy_loss=none)
    t_all = _trainer(EntrotrainGRPOTrainer, tmp_path / "c", model=copy.deepcopy(model), policy_loss=all_)
    _, g_none = _loss_and_grads(t_none, inputs)
    _, g_all = _loss_and_grads(t_all, inputs)
    assert all(torch.equal(g0[k], g_none[k]) for k in g0)
    assert any(not torch.equal(g0[k], g_all[k]) for k in g0)


def test_entropy_bonus_gets_a_gradient_through_trls_entropy(tmp_path):
    t = _trainer(EntrotrainGRPOTrainer, tmp_path, policy_loss=EntropyBonus(1.0))
    inputs = _with_old_logps(t, _inputs(2))
    loss, grads = _loss_and_grads(t, inputs)
    assert loss < 0 and any(g.abs().sum() > 0 for g in grads.values())


def test_bad_policy_loss_and_conflicting_trl_settings_are_refused(tmp_path):
    with pytest.raises(EntrotrainError, match="PolicyLoss"):
        _trainer(EntrotrainGRPOTrainer, tmp_path, policy_loss="clip_cov")
    with pytest.raises(EntrotrainError, match="beta"):
        _trainer(EntrotrainGRPOTrainer, tmp_path, policy_loss=ClipCovLoss(), beta=0.1)
    with pytest.raises(EntrotrainError, match="entropy_coef"):
        _trainer(EntrotrainGRPOTrainer, tmp_path, policy_loss=ClipCovLoss(), entropy_coef=0.01)
    with pytest.raises(EntrotrainError, match="stats_agg"):
        _trainer(EntrotrainGRPOTrainer, tmp_path, stats_agg="mean")


def test_checkpoint_keeps_the_statistics_history_and_the_loss_state(tmp_path):
    loss = PPOClipLoss() + EntropyBonus(0.01, target=5.0)
    t = _trainer(EntrotrainGRPOTrainer, tmp_path / "a", policy_loss=loss, max_steps=2, save_strategy="steps",
                 save_steps=2)
    _train(t)
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert (ckpt / "entrotrain_policy_stats.json").exists() and (ckpt / "entrotrain_policy_loss.pt").exists()
    fresh = _trainer(EntrotrainGRPOTrainer, tmp_path / "b", max_steps=2,
                     policy_loss=PPOClipLoss() + EntropyBonus(0.01, target=5.0))
    fresh.train(resume_from_checkpoint=str(ckpt))  # restores the state (HF runs one more step here)
    before = t.policy_stats.state_dict()["history"]["entropy"]
    after = fresh.policy_stats.state_dict()["history"]["entropy"]
    assert len(before) == 2 and after[:2] == before and len(after) == 3  # restored, then extended
    assert fresh.policy_stats.monitor.delta_pairs["cov"][:1] == t.policy_stats.monitor.delta_pairs["cov"]
    coef = float(loss.terms[1].coef)
    assert coef != 0.01  # the adaptive coefficient moved in the first run; the resumed run continues from it
    assert float(fresh.policy_loss.terms[1].coef) == pytest.approx(coef + 0.005)


@pytest.fixture(scope="module")
def stats_ddp_run(tmp_path_factory):
    """The folder of one run of trl_stats_ddp_run.py (2 gloo ranks, ~15 s) for the tests below."""
    from pathlib import Path

    from tests.helpers.scripts import run_script

    out = tmp_path_factory.mktemp("trl_stats_ddp")
    # a rank left waiting in a collective is killed by the script's watchdog (120 s) and fails here
    run_script(Path(__file__).with_name("trl_stats_ddp_run.py"), out, str(out / "rows.json"), timeout=240)
    return out


def test_two_ranks_equal_one_process_on_the_union(stats_ddp_run):
    """Under 2-rank gloo the statistics (and the ΔH / fit state) are those of one process on the union batch."""
    import json

    from tests.integrations.trl_stats_ddp_run import STEPS, rank_parts

    logged = json.loads((stats_ddp_run / "rows.json").read_text())
    single = PolicyStatsRecorder(fit_min_points=2)
    want = []
    for step in range(STEPS):
        for p in rank_parts(0, step) + rank_parts(1, step):
            single.add(p["token_entropy"], p["logprobs"], p["advantages"], p["response_mask"], rewards=p["rewards"])
        want.append(single.compute(step))
    assert "entropy/policy/fit_ceiling" in want[-1]
    for got, exp in zip(logged, want):
        assert got.keys() == exp.keys()
        for key in exp:
            assert got[key] == pytest.approx(exp[key], rel=1e-12, abs=1e-15), key


def test_a_refusal_on_one_rank_is_the_same_error_on_every_rank_at_compute(stats_ddp_run):
    """Under 2-rank gloo, ``add`` refusing a micro-batch on one rank alone (a mask holding a 2) used to raise there,
    inside that rank's training step, and leave the other rank waiting in ``compute``'s gather (a hang). The refusal
    now waits for ``compute``, the step's exchange: no collective more, and every rank raises the same error naming
    the rank, the micro-batch and the problem. So does ``compute``'s own refusal (rewards for some micro-batches of
    one rank's step only); the ranks then go on together."""
    import json

    got = [json.loads((stats_ddp_run / f"refusals{r}.json").read_text()) for r in range(2)]
    mask, rewards = (got[0]["mask_on_rank1"], got[1]["mask_on_rank1"]), (got[0]["rewards_on_rank0"],
                                                                         got[1]["rewards_on_rank0"])
    for case in (mask, rewards):
        assert [c["add"] for c in case] == ["", ""]  # add raises on neither rank
        assert case[0]["compute"] == case[1]["compute"] != ""  # the same error on both
        assert all("entropy/policy/mean" in c["next"] for c in case)  # the next step is computed on both
        assert case[0]["next"] == case[1]["next"]
    error = mask[0]["compute"]
    assert "at step 4: rank(s) [1] refused the tensors handed over with PolicyStatsRecorder.add()" in error
    assert "micro-batch 0 of the step" in error and "holds values other than 0 and 1 (found [2.0])" in error
    error = rewards[0]["compute"]
    assert "rank(s) [0] refused" in error and "micro-batch(es) [0] of the step handed rewards= over" in error


def test_add_refuses_rewards_not_one_per_sequence_and_a_temperature_not_a_number():
    stats = PolicyStatsRecorder()
    with pytest.raises(EntrotrainError, match=r"one reward per sequence \(2, the rows of the entropy\), got 3"):
        stats.add(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3, dtype=torch.bool),
                  rewards=torch.zeros(3))
    with pytest.raises(EntrotrainError, match=r"advantages has shape \(3,\), expected \(2,\), \(2, 1\) or"):
        stats.add(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(EntrotrainError, match=r"temperature must be a number .* got 'hot'"):
        stats.add(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3, dtype=torch.bool),
                  temperature="hot")
    assert not stats.pending


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)], ids=["no-rows", "no-tokens", "empty"])
def test_empty_micro_batches_give_counts_and_no_entropy_keys(shape):
    stats = PolicyStatsRecorder()
    stats.add(torch.zeros(shape), torch.zeros(shape), torch.zeros(shape[0]), torch.ones(shape, dtype=torch.bool),
              rewards=torch.zeros(shape[0]))
    with pytest.warns(UserWarning, match="no valid"):
        row = stats.compute(0)
    assert row["entropy/policy/tokens"] == 0.0 and "entropy/policy/mean" not in row
    assert stats.compute(1) == {}  # nothing captured since


def test_recorder_refuses_mismatched_shapes():
    stats = PolicyStatsRecorder()
    with pytest.raises(EntrotrainError, match="logprobs"):
        stats.add(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(EntrotrainError, match=r"\(B, T\)"):
        stats.add(torch.zeros(6), torch.zeros(6), torch.zeros(6), torch.ones(6, dtype=torch.bool))


def test_example_script_smoke(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "trl_grpo_kl_cov.py"
    spec = importlib.util.spec_from_file_location("trl_grpo_kl_cov", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--steps", "2", "--runs", "baseline", "kl_cov"])
    assert set(results) == {"baseline", "kl_cov"}
    assert "entropy first -> last" in capsys.readouterr().out
