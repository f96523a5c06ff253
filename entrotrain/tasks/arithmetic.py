"""A verifiable toy task for RL: digit arithmetic whose answers a program checks.

A prompt is ``<bos> a op b =`` with both operands zero-padded to ``num_digits`` (so every prompt has the same
length ``2 * num_digits + 3`` and needs no padding); the answer is the result in decimal without leading zeros
(optionally least-significant digit first), then ``<eos>``. The reward is 1 for an exact answer followed by
``<eos>``, else 0.

Scratch variant (``scratch_tokens > 0``): the response is a variable-length *scratch* ("thinking") phase of digits,
then the separator ``=`` (:data:`SEPARATOR`), then the answer and ``<eos>``, e.g. ``4 9 1 = 1 2 <eos>`` for
``<bos>5+7=``. The reward checks only the answer after the first separator, so the scratch length is the policy's
choice (within the budget :attr:`ArithmeticTask.max_new_tokens`); the warm start writes 0 to ``scratch_tokens``
uniformly random scratch digits. :meth:`ArithmeticTask.phase_ids` splits a response into phase 0 (scratch) and
phase 1 (separator, answer, ``<eos>``) with :func:`~entrotrain.functional.token_shaping.phase_ids_from_delimiter`.

- :data:`VOCAB`, :func:`encode`, :func:`decode`: the 17-token vocabulary (``<pad> <bos> <eos> 0-9 + - * =``).
- :class:`ArithmeticTask`: prompt generation, answer encoding, the reward checker, noisy supervised examples.
- :class:`ArithmeticDataModule`: an endless stream of prompt batches (``prompt_ids``, ``answers``) for GRPO.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from entrotrain._validation import check_int
from entrotrain.errors import EntrotrainError
from entrotrain.functional.token_shaping import phase_ids_from_delimiter

__all__ = [
    "BOS",
    "EOS",
    "PAD",
    "SEPARATOR",
    "VOCAB",
    "VOCAB_SIZE",
    "ArithmeticDataModule",
    "ArithmeticTask",
    "decode",
    "encode",
]

#: Token strings by id. Special tokens first so that id 0 is padding.
VOCAB: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", *"0123456789", "+", "-", "*", "=")
VOCAB_SIZE = len(VOCAB)
PAD, BOS, EOS = 0, 1, 2
_DIGIT0 = 3
#: Id of ``=``: the end of the prompt, and in the scratch variant the separator between scratch and answer.
SEPARATOR = 16
_STOI = {s: i for i, s in enumerate(VOCAB)}
_OPS = {"add": "+", "sub": "-", "mul": "*"}


def encode(text: str) -> list[int]:
    """Ids of a string over ``0-9 + - * =`` (special tokens are not parsed from text)."""
    try:
        return [_STOI[c] for c in text]
    except KeyError as err:
        raise EntrotrainError(f"character {err.args[0]!r} is not in the arithmetic vocabulary {VOCAB}.") from None


def decode(ids: Tensor | list[int], *, stop_at_eos: bool = True) -> str:
    """Text of ids, special tokens dropped; stops at the first ``<eos>`` unless ``stop_at_eos=False``."""
    out = []
    for i in ids.tolist() if isinstance(ids, Tensor) else ids:
        if i == EOS and stop_at_eos:
            break
        if i > EOS:
            out.append(VOCAB[i])
    return "".join(out)


class ArithmeticTask:
    """Prompts ``a op b =`` over ``num_digits``-digit operands and the exact-answer reward.

    Args:
        num_digits: digits per operand (operands are uniform in ``[0, 10**num_digits)``).
        operation: ``"add"``, ``"sub"`` (operands ordered so that the result is ``>= 0``) or ``"mul"``.
        reverse_answer: write the answer least-significant digit first (much easier for a small transformer).
        scratch_tokens: ``0`` (default): the response is the answer. ``S > 0``: the scratch variant; a response
            is ``k`` scratch digits, the separator ``=``, the answer and ``<eos>``, with a budget of ``S`` scratch
            tokens (:attr:`max_new_tokens` ``= S + 1 + max_answer_length + 1``); the warm start draws ``k``
            uniformly in ``[0, S]``.
    """

    def __init__(
        self, num_digits: int = 2, operation: str = "add", reverse_answer: bool = False, scratch_tokens: int = 0
    ) -> None:
        if not isinstance(num_digits, int) or not 1 <= num_digits <= 6:
            raise EntrotrainError(f"num_digits must be an int in [1, 6], got {num_digits!r}.")
        if operation not in _OPS:
            raise EntrotrainError(f"operation must be one of {sorted(_OPS)}, got {operation!r}.")
        self.num_digits = num_digits
        self.operation = operation
        self.reverse_answer = reverse_answer
        self.scratch_tokens = check_int(scratch_tokens, "scratch_tokens", low=0)

    @property
    def prompt_length(self) -> int:
        """``<bos>`` + two operands + operator + ``=``."""
        return 2 * self.num_digits + 3

    @property
    def max_answer_length(self) -> int:
        """Most digits an answer can have (without ``<eos>``)."""
        return 2 * self.num_digits if self.operation == "mul" else self.num_digits + 1

    @property
    def max_new_tokens(self) -> int:
        """Response budget: the longest answer plus ``<eos>`` (scratch variant: plus ``scratch_tokens`` + separator)."""
        extra = self.scratch_tokens + 1 if self.scratch_tokens else 0
        return extra + self.max_answer_length + 1

    @property
    def separator_id(self) -> int | None:
        """The id that ends the scratch phase (:data:`SEPARATOR`), or None without a scratch phase."""
        return SEPARATOR if self.scratch_tokens else None

    def phase_ids(self, response_ids: Tensor, mask: Tensor) -> Tensor | None:
        """Phases of the response tokens (scratch variant), or None (plain task: no phases).

        :func:`~entrotrain.functional.token_shaping.phase_ids_from_delimiter` with the separator: phase 0 = the
        scratch tokens before the first ``=``; phase 1 = that ``=``, the answer and ``<eos>`` (the delimiter opens
        the phase after it, PEAR's ``entropys[:idx]`` split); a response with no ``=`` is all phase 0; ``-1`` where
        ``mask`` (B, R) is False.
        """
        if not self.scratch_tokens:
            return None
        return phase_ids_from_delimiter(response_ids, mask, SEPARATOR)

    def result(self, a: Tensor, b: Tensor) -> Tensor:
        """The true result for operand tensors (``sub`` expects ``a >= b``)."""
        if self.operation == "add":
            return a + b
        if self.operation == "sub":
            return a - b
        return a * b

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` random problems: ``prompt_ids (n, prompt_length)`` int64 and ``answers (n,)`` int64."""
        hi = 10**self.num_digits
        a = torch.randint(0, hi, (n,), generator=generator)
        b = torch.randint(0, hi, (n,), generator=generator)
        if self.operation == "sub":
            a, b = torch.maximum(a, b), torch.minimum(a, b)
        return self.encode_prompts(a, b), self.result(a, b)

    def encode_prompts(self, a: Tensor, b: Tensor) -> Tensor:
        """Prompt ids ``(n, prompt_length)`` for operand tensors ``a, b (n,)``."""
        cols = [torch.full_like(a, BOS)]
        cols += self._digits(a, self.num_digits, reverse=False).unbind(-1)
        cols.append(torch.full_like(a, _STOI[_OPS[self.operation]]))
        cols += self._digits(b, self.num_digits, reverse=False).unbind(-1)
        cols.append(torch.full_like(a, _STOI["="]))
        return torch.stack(cols, dim=-1)

    @staticmethod
    def _digits(x: Tensor, width: int, *, reverse: bool) -> Tensor:
        """Zero-padded digit ids ``(n, width)``, most significant first unless ``reverse``."""
        powers = 10 ** torch.arange(width - 1, -1, -1, device=x.device)
        d = (x[:, None] // powers) % 10 + _DIGIT0
        return d.flip(-1) if reverse else d

    def answer_tokens(self, answers: Tensor, length: int | None = None) -> tuple[Tensor, Tensor]:
        """Target response ids ``(n, length)``: the answer digits, ``<eos>``, then ``<pad>``; and their lengths.

        ``length`` defaults to :attr:`max_new_tokens`. Returns ``(ids, n_digits)``; ``ids[i, n_digits[i]]`` is
        ``<eos>``.
        """
        length = self.max_new_tokens if length is None else length
        if length < self.max_new_tokens:
            raise EntrotrainError(
                f"length {length} cannot hold the longest answer plus <eos> ({self.max_new_tokens}); raise it."
            )
        if bool((answers < 0).any()):
            raise EntrotrainError("answers must be >= 0 (use operation='sub' with ordered operands).")
        width = self.max_answer_length
        n_digits = torch.ones_like(answers)
        for k in range(1, width):
            n_digits = n_digits + (answers >= 10**k).long()
        full = self._digits(answers, width, reverse=False)  # (n, width), most significant first
        pos = torch.arange(width, device=answers.device)
        if self.reverse_answer:
            src = (width - 1 - pos)[None, :].expand(answers.shape[0], width)  # units first
        else:
            src = (width - n_digits[:, None] + pos).clamp(max=width - 1)  # drop the leading zeros
        digits = full.gather(1, src)
        ids = torch.full((answers.shape[0], length), PAD, dtype=torch.long, device=answers.device)
        ids[:, :width] = torch.where(pos < n_digits[:, None], digits, torch.full_like(digits, PAD))
        ids.scatter_(1, n_digits[:, None], EOS)
        return ids, n_digits

    def reward(self, response_ids: Tensor, answers: Tensor) -> Tensor:
        """1.0 where the response is exactly the answer's digits followed by ``<eos>``, else 0.0.

        Scratch variant: 1.0 where the response is ``k >= 0`` digits, ``=``, then exactly the answer's digits and
        ``<eos>``; 0.0 with no ``=`` before the first ``<eos>``, a non-digit before the first ``=`` (malformed
        scratch), or a wrong / unterminated answer (e.g. one cut off by the response budget).

        Args:
            response_ids: ``(n, R)`` generated ids after the prompt (anything after the first ``<eos>`` ignored).
            answers: ``(n,)`` true results.

        Returns:
            ``(n,)`` float32 rewards.
        """
        if response_ids.dim() != 2 or answers.shape != response_ids.shape[:1]:
            raise EntrotrainError(
                f"reward needs response_ids (n, R) and answers (n,), got {tuple(response_ids.shape)} and "
                f"{tuple(answers.shape)}."
            )
        if self.scratch_tokens:
            return self._scratch_reward(response_ids, answers)
        return self._exact_answer(response_ids, answers)

    def _exact_answer(self, response_ids: Tensor, answers: Tensor) -> Tensor:
        """``(n,)`` float32: 1.0 where ``response_ids`` starts with the answer's digits and ``<eos>``."""
        length = response_ids.shape[1]
        target, n_digits = self.answer_tokens(answers, max(length, self.max_new_tokens))
        target = target[:, :length]
        checked = torch.arange(length, device=response_ids.device)[None, :] <= n_digits[:, None]
        ok = ((response_ids == target) | ~checked).all(dim=1) & (n_digits < length)
        return ok.float()

    def _scratch_reward(self, response_ids: Tensor, answers: Tensor) -> Tensor:
        """The scratch variant's reward: the exact answer after the first separator (see :meth:`reward`)."""
        n, length = response_ids.shape
        pos = torch.arange(length, device=response_ids.device)[None, :]
        is_eos = response_ids == EOS
        first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(answers, length))
        is_sep = (response_ids == SEPARATOR) & (pos < first_eos[:, None])
        has_sep = is_sep.any(1)
        sep = is_sep.int().argmax(1)  # first separator (0 when none: masked by has_sep)
        is_digit = (response_ids >= _DIGIT0) & (response_ids < _DIGIT0 + 10)
        scratch_ok = (is_digit | (pos >= sep[:, None])).all(1)
        idx = sep[:, None] + 1 + pos  # the answer, shifted to start at column 0; <pad> past the end
        after = response_ids.gather(1, idx.clamp(max=length - 1))
        after = torch.where(idx < length, after, torch.full_like(after, PAD))
        return (has_sep & scratch_ok & self._exact_answer(after, answers).bool()).float()

    def supervised_batch(
        self, n: int, noise: float = 0.0, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """A noisy supervised batch for the warm start: ``(inputs, targets, loss_mask)``, each ``(n, L - 1)``.

        The sequence is prompt + answer + ``<eos>`` (padded to ``prompt_length + max_new_tokens``); each answer
        digit is replaced by a uniformly random digit with probability ``noise`` (so the warm-started policy
        keeps entropy). ``loss_mask`` is True on the targets that are answer digits or ``<eos>``.

        Scratch variant: the response is ``k ~ U{0..scratch_tokens}`` uniformly random digits, ``=``, the (noisy)
        answer and ``<eos>``; ``loss_mask`` covers the scratch digits and the separator too (so the warm-started
        policy writes scratch phases of varied length and high entropy).
        """
        if not 0.0 <= noise <= 1.0:
            raise EntrotrainError(f"noise must be in [0, 1], got {noise!r}.")
        prompts, answers = self.sample(n, generator)
        resp, n_digits = self.answer_tokens(answers)
        is_digit = torch.arange(resp.shape[1])[None, :] < n_digits[:, None]
        flip = (torch.rand(resp.shape, generator=generator) < noise) & is_digit
        random_digits = torch.randint(0, 10, resp.shape, generator=generator) + _DIGIT0
        resp = torch.where(flip, random_digits, resp)
        last = n_digits  # index of <eos> in the response
        if self.scratch_tokens:
            resp, last = self._with_scratch(resp, n_digits, generator)
        seq = torch.cat([prompts, resp], dim=1)
        p = self.prompt_length
        mask = torch.zeros_like(seq, dtype=torch.bool)
        mask[:, p:] = torch.arange(resp.shape[1])[None, :] <= last[:, None]
        return seq[:, :-1], seq[:, 1:], mask[:, 1:]

    def _with_scratch(
        self, resp: Tensor, n_digits: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """``k`` random scratch digits and ``=`` before each answer ``resp (n, R)``; and the index of ``<eos>``."""
        n, length = resp.shape
        k = torch.randint(0, self.scratch_tokens + 1, (n,), generator=generator)
        scratch = torch.randint(0, 10, (n, length), generator=generator) + _DIGIT0
        pos = torch.arange(length)[None, :]
        idx = (pos - k[:, None] - 1).clamp(min=0)  # k + 1 + answer + <eos> <= R by construction of max_new_tokens
        shifted = resp.gather(1, idx)
        out = torch.where(pos < k[:, None], scratch, torch.where(pos == k[:, None], SEPARATOR, shifted))
        return out, k + 1 + n_digits


class _PromptStream(IterableDataset):
    def __init__(self, task: ArithmeticTask, batch_size: int, num_batches: int, seed: int) -> None:
        self.task, self.batch_size, self.num_batches, self.seed = task, batch_size, num_batches, seed
        self.epoch = 0
        self.rank = 0  # DDP ranks draw different prompts (set by the datamodule)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        g = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch + 7_919 * self.rank)
        self.epoch += 1
        for _ in range(self.num_batches):
            prompt_ids, answers = self.task.sample(self.batch_size, g)
            yield {"prompt_ids": prompt_ids, "answers": answers}


class ArithmeticDataModule(LightningDataModule):
    """Batches of arithmetic prompts for GRPO: ``{"prompt_ids": (N, P) int64, "answers": (N,) int64}``.

    One batch is one rollout's prompts (each is sampled ``group_size`` times by :class:`GRPOTask`).

    Args:
        num_digits: digits per operand.
        operation: ``"add"``, ``"sub"`` or ``"mul"``.
        reverse_answer: answers least-significant digit first.
        scratch_tokens: ``> 0``: the scratch variant (responses ``digits* = answer <eos>``; see
            :class:`ArithmeticTask`) with this scratch budget; ``0`` (default): plain answers.
        prompts_per_batch: prompts per rollout ``N`` on each DDP rank (ranks draw different prompts; the global rollout
            is ``world_size × N`` prompts).
        num_batches: rollouts per epoch (run ``max_epochs: 1`` for exactly this many RL iterations).
        seed: seeds the prompt generator (each epoch draws fresh prompts).
    """

    def __init__(
        self,
        num_digits: int = 2,
        operation: str = "add",
        reverse_answer: bool = False,
        prompts_per_batch: int = 32,
        num_batches: int = 100,
        seed: int = 0,
        scratch_tokens: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # a checkpoint names this datamodule (entrotrain inspect rebuilds it)
        if prompts_per_batch < 1 or num_batches < 1:
            raise EntrotrainError(
                f"prompts_per_batch and num_batches must be >= 1, got {prompts_per_batch} and {num_batches}."
            )
        self.task = ArithmeticTask(
            num_digits=num_digits, operation=operation, reverse_answer=reverse_answer, scratch_tokens=scratch_tokens
        )
        self.prompts_per_batch = prompts_per_batch
        self.num_batches = num_batches
        self.seed = seed
        self._stream = _PromptStream(self.task, prompts_per_batch, num_batches, seed)

    def train_dataloader(self) -> DataLoader:
        self._stream.rank = self.trainer.global_rank if self.trainer is not None else 0
        return DataLoader(self._stream, batch_size=None, num_workers=0)
