r"""GRPO (group relative policy optimisation) on a program-checked task, in Lightning.

Each ``training_step`` is one RL iteration (manual optimisation):

1. **Rollout**: every prompt of the batch is sampled ``group_size`` times with the current policy at
   ``temperature`` (full recompute per new token; no KV cache at these sizes), stopping at ``<eos>``.
2. **Rewards** from the task's checker (:meth:`ArithmeticTask.reward`).
3. **Group-normalised advantages** :math:`A_i = (r_i - \bar r_g) / (s_g + \epsilon)` with :math:`s_g` the unbiased
   standard deviation of the group (as verl's GRPO), or :math:`A_i = r_i - \bar r_g` (``norm_by_std=False``,
   Dr. GRPO). Every token of a response gets its sequence's advantage.
4. **Old log-probs** and per-token entropies of the sampling distribution (one no-grad pass).
5. ``ppo_epochs`` passes over ``num_mini_batches`` shuffled mini-batches, each one optimizer step of the
   configured ``policy_loss`` (+ ``entropy_bonus``), with gradient-norm clipping. With more than one update per
   rollout the later updates are off-policy (needed for KL-Cov to have a gradient).

A supervised warm start (``sft_steps`` steps of cross-entropy on program-generated answers whose digits are
replaced at random with probability ``sft_noise``) runs once at the start of ``fit`` so that RL begins with a
non-zero reward and a policy that still has entropy.

Under DDP (``configs/trainer/ddp.yaml``) each rank rolls out its own prompts and every update's gradients are
averaged across ranks (Lightning prepares DDP's reducer at each ``manual_backward``), so the ranks stay identical;
Clip-Cov / KL-Cov in ``mode="global"`` then centre and select over the whole rollout of all ranks.

Log-prob alignment: for a sequence ``prompt (P) + response (R)`` the model reads ``seq[:, :-1]`` and the logits at
position ``P - 1 + t`` score response token ``t``.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from entrotrain.errors import EntrotrainError
from entrotrain.functional.policy import token_entropy, token_logprobs
from entrotrain.models.tiny_gpt import TinyGPT
from entrotrain.tasks.arithmetic import EOS, PAD, VOCAB_SIZE, ArithmeticTask

__all__ = ["GRPOTask", "group_advantages", "response_mask"]


def group_advantages(rewards: Tensor, group_size: int, *, norm_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    r"""GRPO advantages of consecutive groups: :math:`(r - \bar r_g) / (s_g + \epsilon)` or :math:`r - \bar r_g`.

    Args:
        rewards: ``(B,)`` with ``B = prompts * group_size``, the samples of one prompt adjacent.
        group_size: samples per prompt ``G >= 2``.
        norm_by_std: divide by the group's unbiased standard deviation (GRPO); ``False`` is Dr. GRPO.
        eps: added to the standard deviation (a group with equal rewards gets advantage 0).

    Returns:
        ``(B,)`` float32.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise EntrotrainError(
            f"rewards must be (B,) with B a multiple of group_size={group_size}, got {tuple(rewards.shape)}."
        )
    if group_size < 2:
        raise EntrotrainError(f"group_size must be >= 2 for group-normalised advantages, got {group_size}.")
    r = rewards.float().view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if norm_by_std:
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def response_mask(response_ids: Tensor) -> Tensor:
    """``(B, R)`` bool: the response tokens up to and including the first ``<eos>`` (none after it)."""
    is_eos = (response_ids == EOS).long()
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos  # number of <eos> strictly before each position
    return eos_before == 0


class GRPOTask(LightningModule):
    """GRPO with a :class:`TinyGPT` policy on :class:`ArithmeticDataModule` prompts (manual optimisation).

    The datamodule must expose ``task`` (an :class:`ArithmeticTask`) for rewards and the warm start.

    ``training_step`` returns, from the rollout's no-grad pass (for :class:`PolicyEntropyMonitor`):
    ``token_entropy (B, R)`` (float32, at ``temperature``), ``logprobs (B, R)``, ``advantages (B,)``,
    ``response_mask (B, R)`` bool, ``rewards (B,)``, ``temperature``, and ``post_logprobs`` /
    ``post_token_entropy (B, R)`` from a no-grad pass after the updates (with a ``reward_shaping``: also
    ``shaped_rewards (B,)`` and, when the shaper reports phases, ``phase_ids (B, R)``; otherwise ``phase_ids`` from
    the task's :meth:`~ArithmeticTask.phase_ids` when it has phases: the scratch variant, 0 = scratch, 1 = separator
    and answer). With phases the end-of-fit summary adds per-phase entropy, scratch (phase-0) length, response
    length and greedy accuracy, first → last. It logs ``grpo/reward_mean``,
    ``grpo/accuracy`` (fraction of prompts with at least one correct sample), ``grpo/greedy_accuracy``,
    ``grpo/response_length``, ``grpo/token_entropy``, ``grpo/post_token_entropy``, ``grpo/loss``, ``grpo/grad_norm``,
    and the policy loss's metrics as ``grpo/{name}``.

    Args:
        n_layer: transformer blocks of the policy.
        n_head: attention heads per block.
        n_embd: model width.
        block_size: maximum sequence length (prompt + response).
        group_size: samples per prompt ``G``.
        temperature: sampling temperature (log-probs, entropies and the loss use the same one).
        ppo_epochs: passes over each rollout.
        num_mini_batches: optimizer steps per pass (the rollout split into this many shuffled mini-batches).
        lr: AdamW learning rate for RL.
        weight_decay: AdamW weight decay.
        grad_clip: gradient-norm clip per update (``0`` disables).
        norm_by_std: GRPO's division by the group standard deviation (``False``: Dr. GRPO).
        policy_loss: a policy-loss module ``(logprobs, old_logprobs, advantages, mask, *, entropy, step)``
            from :mod:`entrotrain.regularizers` (default ``PPOClipLoss()``).
        entropy_bonus: optional extra loss called the same way with the differentiable entropy of the current
            policy, e.g. ``EntropyBonus``.
        reward_shaping: optional reward shaper ``(rewards, entropy, mask, *, token_ids, step) -> ShapedRewards``
            (e.g. :class:`~entrotrain.regularizers.token_shaping.PEARShaping`), applied to the checker's rewards
            with the rollout's per-token entropies before the advantages; ``grpo/reward_mean`` stays the task
            reward, ``grpo/shaped_reward_mean`` and the shaper's metrics (``grpo/pear/...``) are logged, and its
            phases are returned as ``phase_ids`` (for :class:`PolicyEntropyMonitor`).
        advantage_estimator: optional ``(rewards, group_size, *, entropy, mask, step) -> AdvantageOutput``
            replacing the group-normalised advantages (e.g.
            :class:`~entrotrain.regularizers.token_shaping.CANONAdvantage`; its metrics are logged as
            ``grpo/canon/...``). ``norm_by_std`` is then unused.
        sft_steps: warm-start steps of supervised cross-entropy before RL (``0`` skips it).
        sft_batch_size: warm-start batch size.
        sft_lr: warm-start learning rate (Adam).
        sft_noise: probability that a warm-start answer digit is replaced by a random digit.
        seed: seeds rollout sampling, the warm-start data and mini-batch shuffling.
    """

    def __init__(
        self,
        n_layer: int = 2,
        n_head: int = 4,
        n_embd: int = 64,
        block_size: int = 16,
        group_size: int = 8,
        temperature: float = 1.0,
        ppo_epochs: int = 2,
        num_mini_batches: int = 2,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        grad_clip: float = 1.0,
        norm_by_std: bool = True,
        policy_loss: nn.Module | None = None,
        entropy_bonus: nn.Module | None = None,
        reward_shaping: nn.Module | None = None,
        advantage_estimator: nn.Module | None = None,
        sft_steps: int = 300,
        sft_batch_size: int = 128,
        sft_lr: float = 3e-3,
        sft_noise: float = 0.3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["policy_loss", "entropy_bonus", "reward_shaping", "advantage_estimator"])
        if group_size < 2:
            raise EntrotrainError(f"group_size must be >= 2 (advantages are relative to the group), got {group_size}.")
        if not temperature > 0:
            raise EntrotrainError(f"temperature must be > 0, got {temperature!r}.")
        if ppo_epochs < 1 or num_mini_batches < 1:
            raise EntrotrainError(
                f"ppo_epochs and num_mini_batches must be >= 1, got {ppo_epochs} and {num_mini_batches}."
            )
        if not 0.0 <= sft_noise <= 1.0:
            raise EntrotrainError(f"sft_noise must be in [0, 1], got {sft_noise!r}.")
        self.automatic_optimization = False
        self.model = TinyGPT(VOCAB_SIZE, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        if policy_loss is None:
            from entrotrain.regularizers import PPOClipLoss  # noqa: PLC0415  (lazy: optional heavy import)

            policy_loss = PPOClipLoss()
        self.policy_loss = policy_loss
        self.entropy_bonus = entropy_bonus
        self.reward_shaping = reward_shaping
        self.advantage_estimator = advantage_estimator
        self.register_buffer("warm_started", torch.tensor(False))
        self._generator: torch.Generator | None = None
        self._history: list[tuple[float, float]] = []  # (mean token entropy, reward mean) per rollout
        # with phases (scratch task or a phase-reporting shaper): (phase-0 entropy, phase-1 entropy, phase-0 length,
        # response length, greedy accuracy) per rollout
        self._phase_history: list[tuple[float, ...]] = []

    # ------------------------------------------------------------------------------------------------ helpers

    def forward(self, idx: Tensor) -> Tensor:
        """Logits ``(B, T, V)`` for ids ``(B, T)``."""
        return self.model(idx)

    @property
    def task(self) -> ArithmeticTask:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        task = getattr(dm, "task", None)
        if not isinstance(task, ArithmeticTask):
            raise EntrotrainError(
                "GRPOTask needs a datamodule with a `task` (ArithmeticTask) for rewards; use "
                "data: class_path: entrotrain.tasks.ArithmeticDataModule."
            )
        return task

    def _rng(self) -> torch.Generator:
        if self._generator is None or self._generator.device != self.device:
            seed = self.hparams.seed + 1_000_003 * self.global_rank  # ranks sample different responses
            self._generator = torch.Generator(device=self.device).manual_seed(seed)
        return self._generator

    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, max_new_tokens: int, *, greedy: bool = False) -> Tensor:
        """Sample ``max_new_tokens`` tokens after ``prompt_ids (B, P)`` at ``temperature``; ``<pad>`` after ``<eos>``.

        Returns the response ids ``(B, max_new_tokens)``.
        """
        if prompt_ids.shape[1] + max_new_tokens - 1 > self.model.block_size:
            raise EntrotrainError(
                f"prompt ({prompt_ids.shape[1]}) + response ({max_new_tokens}) tokens exceed block_size + 1 "
                f"({self.model.block_size + 1}); raise block_size."
            )
        seq = prompt_ids
        done = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
        out = []
        for _ in range(max_new_tokens):
            logits = self.model(seq)[:, -1].float()
            if greedy:
                nxt = logits.argmax(dim=-1)
            else:
                probs = torch.softmax(logits / self.hparams.temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=self._rng()).squeeze(-1)
            nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
            out.append(nxt)
            done = done | (nxt == EOS)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
        return torch.stack(out, dim=1)

    def response_logits(self, prompt_ids: Tensor, response_ids: Tensor) -> Tensor:
        """Logits ``(B, R, V)`` that score each response token (position ``P - 1 + t`` scores token ``t``)."""
        seq = torch.cat([prompt_ids, response_ids], dim=1)
        p = prompt_ids.shape[1]
        return self.model(seq[:, :-1])[:, p - 1 :]

    # ------------------------------------------------------------------------------------------------ warm start

    def on_fit_start(self) -> None:
        task = self.task
        need = task.prompt_length + task.max_new_tokens - 1
        if need > self.model.block_size:
            raise EntrotrainError(
                f"block_size {self.model.block_size} < {need} tokens (prompt + response - 1); set "
                f"model.init_args.block_size >= {need}."
            )
        if self.hparams.sft_steps > 0 and not bool(self.warm_started):
            self.warm_start(task)

    def warm_start(self, task: ArithmeticTask) -> float:
        """Supervised cross-entropy on noisy program-generated answers; returns the last loss."""
        hp = self.hparams
        g = torch.Generator().manual_seed(hp.seed + 17)
        opt = torch.optim.Adam(self.model.parameters(), lr=hp.sft_lr)
        self.model.train()
        loss = torch.zeros(())
        for step in range(hp.sft_steps):
            x, y, m = (t.to(self.device) for t in task.supervised_batch(hp.sft_batch_size, hp.sft_noise, g))
            lr = hp.sft_lr * min(1.0, (step + 1) / 20) * (1 - step / hp.sft_steps)  # warm-up, linear decay
            for group in opt.param_groups:
                group["lr"] = lr
            logits = self.model(x).float()
            loss = nn.functional.cross_entropy(logits[m], y[m])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        self.warm_started.fill_(True)
        final = float(loss.detach())
        if self._trainer is None or self.trainer.is_global_zero:
            print(f"GRPO warm start: {hp.sft_steps} supervised steps (answer noise {hp.sft_noise}), loss {final:.3f}")
        return final

    # ------------------------------------------------------------------------------------------------ RL step

    def update_loss(
        self,
        prompt_ids: Tensor,
        response_ids: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        mask: Tensor,
        old_entropy: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one mini-batch under the current policy (``policy_loss`` + ``entropy_bonus``) and its metrics.

        ``old_entropy`` (the rollout's per-token entropy) is passed to ``policy_loss`` as ``entropy=``; the bonus
        gets the differentiable entropy of the current policy.
        """
        t = self.hparams.temperature
        logits = self.response_logits(prompt_ids, response_ids)
        lp = token_logprobs(logits, response_ids, temperature=t)
        out = self.policy_loss(lp, old_logprobs, advantages, mask, entropy=old_entropy, step=self.global_step)
        loss = out.loss
        metrics = dict(out.metrics)
        if self.entropy_bonus is not None:
            ent = token_entropy(logits, mask, temperature=t)
            bonus = self.entropy_bonus(lp, old_logprobs, advantages, mask, entropy=ent, step=self.global_step)
            loss = loss + bonus.loss
            metrics.update(bonus.metrics)
        return loss, metrics

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any]:
        hp = self.hparams
        task = self.task
        G = hp.group_size
        prompts = batch["prompt_ids"].repeat_interleave(G, dim=0)
        answers = batch["answers"].repeat_interleave(G, dim=0)

        # 1-4: rollout, rewards, advantages, old log-probs and entropies (no grad)
        self.model.eval()
        resp = self.generate(prompts, task.max_new_tokens)
        mask = response_mask(resp)
        rewards = task.reward(resp, answers).to(self.device)
        with torch.no_grad():
            logits = self.response_logits(prompts, resp)
            old_lp = token_logprobs(logits, resp, temperature=hp.temperature)
            ent = token_entropy(logits, mask, temperature=hp.temperature)
            greedy = self.generate(batch["prompt_ids"], task.max_new_tokens, greedy=True)
            greedy_acc = task.reward(greedy, batch["answers"]).mean()
        self.model.train()
        adv, shaped, phase_ids, shaping_logs = self.advantages(rewards, ent, mask, resp)
        if phase_ids is None:  # the task's own phases (the scratch variant), if it has any
            phase_ids = task.phase_ids(resp, mask)

        # 5: PPO epochs x mini-batches
        opt = self.optimizers()
        B = prompts.shape[0]
        sums: dict[str, Tensor] = {}
        n_updates = 0
        for _ in range(hp.ppo_epochs):
            perm = torch.randperm(B, generator=self._rng(), device=self.device)
            for idx in perm.chunk(hp.num_mini_batches):
                loss, metrics = self.update_loss(prompts[idx], resp[idx], old_lp[idx], adv[idx], mask[idx], ent[idx])
                opt.zero_grad()
                self.manual_backward(loss)
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    self.model.parameters(), hp.grad_clip if hp.grad_clip > 0 else float("inf")
                )
                opt.step()
                metrics.update(loss=loss.detach(), grad_norm=grad_norm.detach())
                for k, v in metrics.items():
                    v = torch.as_tensor(v, device=self.device).detach().float()
                    if v.numel() == 1:
                        sums[k] = sums.get(k, 0.0) + v.reshape(())
                n_updates += 1

        with torch.no_grad():
            logits = self.response_logits(prompts, resp)
            post_lp = token_logprobs(logits, resp, temperature=hp.temperature)
            post_ent = token_entropy(logits, mask, temperature=hp.temperature)

        valid = mask.float()
        n_tok = valid.sum().clamp_min(1)
        mean_ent = (ent * valid).sum() / n_tok
        post_mean_ent = (post_ent * valid).sum() / n_tok
        acc = rewards.view(-1, G).amax(dim=1).mean()
        self._history.append((float(mean_ent), float(rewards.mean())))
        if phase_ids is not None:
            self._phase_history.append(self._phase_row(ent, mask, phase_ids, float(greedy_acc)))
        logs = {
            "grpo/reward_mean": rewards.mean(),
            "grpo/accuracy": acc,
            "grpo/greedy_accuracy": greedy_acc,
            "grpo/response_length": valid.sum(dim=1).mean(),
            "grpo/token_entropy": mean_ent,
            "grpo/post_token_entropy": post_mean_ent,
            "grpo/updates": torch.tensor(float(n_updates)),
        }
        logs.update({f"grpo/{k}": v / n_updates for k, v in sums.items()})
        logs.update(shaping_logs)
        bs = batch["prompt_ids"].shape[0]
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=bs)
        self.log("grpo/reward", rewards.mean(), prog_bar=True, batch_size=bs)
        self.log("grpo/entropy", mean_ent, prog_bar=True, batch_size=bs)
        out = {
            "loss": sums["loss"] / n_updates,
            "token_entropy": ent.detach(),
            "logprobs": old_lp.detach(),
            "advantages": adv.detach(),
            "response_mask": mask,
            "rewards": rewards.detach(),
            "temperature": float(hp.temperature),
            "post_logprobs": post_lp.detach(),
            "post_token_entropy": post_ent.detach(),
        }
        if phase_ids is not None:
            out["phase_ids"] = phase_ids
        if shaped is not rewards:
            out["shaped_rewards"] = shaped.detach()
        return out

    def advantages(
        self, rewards: Tensor, entropy: Tensor, mask: Tensor, response_ids: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None, dict[str, Tensor]]:
        """``(advantages (B,), shaped rewards (B,), phase ids or None, logs)`` of one rollout.

        Without ``reward_shaping`` / ``advantage_estimator`` this is :func:`group_advantages` of the task rewards
        (the shaped rewards are the rewards themselves).
        """
        hp = self.hparams
        shaped, phase_ids, logs = rewards, None, {}
        if self.reward_shaping is not None:
            out = self.reward_shaping(rewards, entropy, mask, token_ids=response_ids, step=self.global_step)
            shaped, phase_ids = out.rewards, out.phase_ids
            logs["grpo/shaped_reward_mean"] = shaped.float().mean()
            logs.update({f"grpo/{k}": torch.as_tensor(v).detach().float() for k, v in out.metrics.items()})
        if self.advantage_estimator is None:
            return group_advantages(shaped, hp.group_size, norm_by_std=hp.norm_by_std), shaped, phase_ids, logs
        est = self.advantage_estimator(shaped, hp.group_size, entropy=entropy, mask=mask, step=self.global_step)
        logs.update({f"grpo/{k}": torch.as_tensor(v).detach().float() for k, v in est.metrics.items()})
        return est.advantages.float(), shaped, phase_ids, logs

    @staticmethod
    def _phase_row(ent: Tensor, mask: Tensor, phase_ids: Tensor, greedy_acc: float) -> tuple[float, ...]:
        """Token-mean entropy of phases 0 / 1 (NaN when empty), mean phase-0 and response length, greedy accuracy."""
        valid = mask & (phase_ids >= 0)
        rows = max(mask.shape[0], 1)
        out = []
        for k in (0, 1):
            m = (valid & (phase_ids == k)).float()
            out.append(float((ent * m).sum() / m.sum()) if bool(m.any()) else float("nan"))
        think_len = float((valid & (phase_ids == 0)).sum()) / rows
        return (*out, think_len, float(mask.sum()) / rows, greedy_acc)

    def on_fit_end(self) -> None:
        if not self._history or not self.trainer.is_global_zero:
            return
        print(self.summary())

    def summary(self) -> str:
        """First and last rollout's mean token entropy and reward (and the mean over the last 5 rollouts)."""
        if not self._history:
            return "GRPO: no rollout yet"
        (h0, r0), (h1, r1) = self._history[0], self._history[-1]
        tail = self._history[-5:]
        ht = sum(h for h, _ in tail) / len(tail)
        rt = sum(r for _, r in tail) / len(tail)
        ratio = h0 / max(h1, 1e-12)
        return (
            f"GRPO over {len(self._history)} rollouts (temperature {self.hparams.temperature}):\n"
            f"  token entropy  first {h0:.4f}  last {h1:.4f}  (÷{ratio:.1f}; last-5 mean {ht:.4f})\n"
            f"  reward mean    first {r0:.4f}  last {r1:.4f}  (last-5 mean {rt:.4f})"
        ) + self._phase_summary()

    def _phase_summary(self) -> str:
        """Extra summary lines with phases (empty without): per-phase entropy, scratch length, greedy accuracy."""
        if not self._phase_history:
            return ""
        first, last = self._phase_history[0], self._phase_history[-1]
        tail = self._phase_history[-5:]
        names = ("phase-0 entropy", "phase-1 entropy", "phase-0 length", "response length", "greedy accuracy")
        lines = []
        for i, name in enumerate(names):
            vals = [row[i] for row in tail if row[i] == row[i]]
            mean = sum(vals) / len(vals) if vals else float("nan")
            lines.append(f"  {name:<15s} first {first[i]:.4f}  last {last[i]:.4f}  (last-5 mean {mean:.4f})")
        return "\n" + "\n".join(lines)

    def configure_optimizers(self):  # noqa: ANN201 - Lightning's return type is a union
        params = list(self.model.parameters())
        extra = [p for m in (self.policy_loss, self.entropy_bonus) if m is not None for p in m.parameters()]
        groups = [{"params": params, "weight_decay": self.hparams.weight_decay}]
        if extra:  # e.g. an adaptive entropy coefficient
            groups.append({"params": extra, "weight_decay": 0.0})
        return torch.optim.AdamW(groups, lr=self.hparams.lr, betas=(0.9, 0.99))
