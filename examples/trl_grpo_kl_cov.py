r"""Policy-entropy collapse and KL-Cov inside TRL's ``GRPOTrainer``, on CPU in a few minutes.

The TRL counterpart of ``recipes/grpo_baseline.yaml`` / ``grpo_kl_cov.yaml``: GRPO on a program-checked task
(one-digit addition ``a+b=`` with ``a, b <= 3``; reward 1 for exactly the sum, 0.5 when the answer starts with it),
a tiny ``Qwen2ForCausalLM`` built from a config (random weights) and a character tokenizer built in code. Two runs with
the same seed, data and settings, differing only in the loss:

- ``baseline``: entrotrain's plain clipped loss (bit-identical to TRL's ``loss_type="grpo"``);
- ``kl_cov``: entrotrain's :class:`~entrotrain.regularizers.policy_loss.KLCovLoss` (Cui et al. 2025) at a ratio far
  above the paper's (a toy batch has ~100 tokens, not millions).

Both: 32 completions (4 prompts x 8) per rollout, ``num_iterations=4`` updates per rollout (the later ones are
off-policy: KL-Cov has no gradient on-policy), Adam at 2e-3, 600 steps, temperature 1.

Both log ``entropy/policy/...`` through :class:`~entrotrain.integrations.trl.EntrotrainGRPOTrainer`; the script
prints each run's entropy and reward at the start and the end, then the contrast.

    OMP_NUM_THREADS=1 python examples/trl_grpo_kl_cov.py            # both runs (about 2.5 minutes on 2 CPU cores)
    python examples/trl_grpo_kl_cov.py --steps 4 --runs baseline     # a smoke run
"""

from __future__ import annotations

import argparse
import random
import tempfile

import torch
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from trl import GRPOConfig

from entrotrain.integrations.trl import EntrotrainGRPOTrainer, trl_grpo_loss
from entrotrain.regularizers.policy_loss import KLCovLoss

CHARS = "0123456789+="
MAX_OPERAND = 3  # a, b in 0..3: 16 prompts, answers 0..6


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, ``<pad>`` = 0, ``<eos>`` = 1, left padding (what TRL's generation expects)."""
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left")


def tiny_qwen2(vocab_size: int, seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, eos_token_id=1, bos_token_id=1,
        tie_word_embeddings=True,
    )  # fmt: skip
    return Qwen2ForCausalLM(config)


def addition_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    return [f"{a}+{b}=" for a, b in (rng.choice(pairs) for _ in range(n))]


def addition_reward(completions: list[str], prompts: list[str], **kwargs) -> list[float]:
    """1 for exactly the sum, 0.5 when the completion starts with it, else 0 (the program checks the answer)."""
    out = []
    for prompt, completion in zip(prompts, completions):
        answer = str(int(prompt[0]) + int(prompt[2]))
        text = completion.strip()
        out.append(1.0 if text == answer else 0.5 if text.startswith(answer) else 0.0)
    return out


def run(
    name: str,
    steps: int,
    seed: int = 0,
    log_every: int = 5,
    print_summary: bool = False,
    lr: float = 2e-3,
    k_ratio: float = 0.2,
    num_iterations: int = 4,
) -> dict[str, float]:
    """One GRPO run; returns the first and last logged entropy and reward."""
    tokenizer = char_tokenizer()
    model = tiny_qwen2(len(tokenizer), seed)
    if name == "baseline":
        loss = trl_grpo_loss(0.2, 0.2)
    elif name == "kl_cov":
        loss = KLCovLoss(k_ratio=k_ratio, kl_coef=1.0, agg="seq-mean-token-mean", mode="global")
    else:
        raise ValueError(f"unknown run {name!r}: baseline or kl_cov")
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out, use_cpu=True, bf16=False, report_to="none", seed=seed, max_steps=steps,
            per_device_train_batch_size=32, num_generations=8, max_completion_length=4, num_iterations=num_iterations,
            learning_rate=lr, lr_scheduler_type="constant", logging_steps=log_every, save_strategy="no",
            disable_tqdm=True, beta=0.0,
        )  # fmt: skip
        trainer = EntrotrainGRPOTrainer(
            model=model, reward_funcs=addition_reward, args=args, processing_class=tokenizer,
            train_dataset=Dataset.from_dict({"prompt": addition_prompts(4096, seed)}),
            policy_loss=loss, print_summary=print_summary,
        )  # fmt: skip
        trainer.train()
    rows = [r for r in trainer.state.log_history if "entropy/policy/mean" in r]
    tail = rows[-max(1, len(rows) // 4) :]  # the last quarter of the logged steps (rewards of 32 samples are noisy)
    nan = float("nan")
    return {
        "entropy_first": rows[0]["entropy/policy/mean"],
        "entropy_last": sum(r["entropy/policy/mean"] for r in tail) / len(tail),
        "reward_first": rows[0]["entropy/policy/reward_mean"],
        "reward_last": sum(r["entropy/policy/reward_mean"] for r in tail) / len(tail),
        "fit_ceiling": rows[-1].get("entropy/policy/fit_ceiling", nan),
        "fit_r2": rows[-1].get("entropy/policy/fit_r2", nan),
        "fit_shown": rows[-1].get("entropy/policy/fit_shown", 0.0),  # 0: b - a is no prediction (ceiling_verdict)
        "steps": float(steps),
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--runs", nargs="+", default=["baseline", "kl_cov"], choices=["baseline", "kl_cov"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--k-ratio", type=float, default=0.2, help="KL-Cov's fraction of tokens")
    parser.add_argument("--num-iterations", type=int, default=4, help="updates per rollout (>= 2: off-policy)")
    ns = parser.parse_args(argv)
    results = {}
    for name in ns.runs:
        results[name] = run(
            name, ns.steps, ns.seed, log_every=max(1, min(5, ns.steps // 2)), lr=ns.lr, k_ratio=ns.k_ratio,
            num_iterations=ns.num_iterations,
        )
    print(f"\nGRPO in TRL, {ns.steps} steps: token entropy (nats, seq-mean-token-mean) and mean reward, first logged "
          "step -> mean of the last quarter of the logged steps; fitted ceiling b - a of R = -a exp(H) + b (R², and "
          "'no prediction' when entrotrain.functional.ceiling_verdict rejects it: too few points, low R², H = 0 far "
          "outside the data or b - a far outside the rewards)")
    print("  run        entropy first -> last      reward first -> last      ceiling")
    for name, r in results.items():
        note = "" if r["fit_shown"] else ", no prediction"
        print(f"  {name:<9s}  {r['entropy_first']:.3f} -> {r['entropy_last']:.3f}"
              f"            {r['reward_first']:.3f} -> {r['reward_last']:.3f}            {r['fit_ceiling']:.3f}"
              f" (R² {r['fit_r2']:.2f}{note})")
    return results


if __name__ == "__main__":
    main()
