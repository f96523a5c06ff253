"""Checkpoints to inspect, and the batches to inspect them on: what ``entrotrain inspect`` reads.

Two kinds of checkpoint, told apart by what is on disk:

- **Lightning** (``*.ckpt``, e.g. ``epoch=0-step=200.ckpt``). A checkpoint written by ``entrotrain fit`` or any
  ``LightningCLI`` run names its ``LightningModule`` and ``LightningDataModule`` classes and their arguments, so it
  rebuilds both by itself: :func:`load_lightning`. Lightning refuses to import a class a checkpoint names (a
  checkpoint could name any code); entrotrain's own classes are imported, any other module must be named by the user
  (``--import my_project.models``). The batches are the datamodule's validation (or training) batches.
- **Hugging Face** (a folder with ``config.json``: ``save_pretrained``, ``Trainer``'s ``output_dir/checkpoint-N``).
  Loaded from disk only (``local_files_only``), with SDPA attention; the batches are windows of a text file tokenised
  with the checkpoint's own tokenizer (:func:`text_batches`).

A folder expands to the checkpoints inside it (``checkpoint-N`` folders, or ``*.ckpt`` files at any depth), ordered
by the training step their name carries (``step=N``, ``checkpoint-N``, ``step_N``), so a run's checkpoints read as a
trajectory.
"""

from __future__ import annotations

import functools
import importlib
import pickle
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from entrotrain.callbacks.checkpoint_keeper import _COPY_SUFFIX, KEEP_FOLDER
from entrotrain.callbacks.collapse_guard import saved_at
from entrotrain.dashboards.run_reader import missing_path, natural_order
from entrotrain.errors import EntrotrainError

__all__ = [
    "Checkpoint", "find_checkpoints", "lightning_batches", "lightning_forward", "load_checkpoint_light", "load_hf",
    "load_hf_tokenizer", "load_lightning", "text_batches",
]



@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint: its path, its kind (``"lightning"`` or ``"hf"``) and the training step its name carries (a
    Lightning checkpoint whose name carries none, ``last.ckpt``: the ``global_step`` it stores)."""

    path: Path
    kind: str
    step: int | None

    @property
    def label(self) -> str:
        return f"step {self.step}" if self.step is not None else self.path.name


def load_checkpoint_light(path: str | Path) -> dict[str, Any]:
    """A checkpoint file's dict (``weights_only``: no code runs), its tensors memory-mapped where the format allows,
    so nothing large is read: for its step, hyperparameters and run-record entry."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not the zip format: mmap is not possible
        return torch.load(path, map_location="cpu", weights_only=True)


def _stored_step(path: Path) -> int | None:
    """The ``global_step`` a Lightning checkpoint stores, read without its tensors (``None`` if it cannot be read)."""
    try:
        checkpoint = load_checkpoint_light(path)
    except Exception:  # noqa: BLE001 - unreadable here: load_lightning says why when it is inspected
        return None
    step = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _lightning(path: Path) -> Checkpoint:
    step = saved_at(path)
    return Checkpoint(path, "lightning", step if step is not None else _stored_step(path))


def _is_hf(path: Path) -> bool:
    """A model folder (config.json), not one a collapse guard is linking into its keep folder (or a crash left)."""
    return path.is_dir() and (path / "config.json").is_file() and not path.name.endswith(_COPY_SUFFIX)


def _expand(path: Path) -> list[Checkpoint]:
    if path.is_file():
        if path.suffix != ".ckpt":
            raise EntrotrainError(
                f"entrotrain inspect: {path} is neither a Lightning checkpoint (*.ckpt) nor a Hugging Face model "
                "folder (one holding config.json); pass a checkpoint, or a folder of them."
            )
        return [_lightning(path)]
    kept = path / KEEP_FOLDER
    hf = [Checkpoint(p, "hf", saved_at(p)) for folder in (path, kept) if folder.is_dir()
          for p in folder.iterdir() if _is_hf(p)]
    hf = _without_kept_copies(hf)
    if _is_hf(path):  # a model; Trainer's output_dir is one (save_model) with its checkpoint-N folders inside
        return [*(c for c in hf if c.step is not None), Checkpoint(path, "hf", saved_at(path))]
    if hf:
        return hf
    found = _without_kept_copies([_lightning(p) for p in path.rglob("*.ckpt") if p.is_file()])
    if not found:
        raise EntrotrainError(
            f"entrotrain inspect: no checkpoint in {path}: no *.ckpt file below it, no config.json in it or in a "
            "folder directly inside it. Lightning saves checkpoints only with checkpointing on: add "
            "`--trainer.enable_checkpointing true --trainer.callbacks+=ModelCheckpoint "
            "--trainer.callbacks.every_n_train_steps 50 --trainer.callbacks.save_top_k -1` to `entrotrain fit`."
        )
    return found


def _without_kept_copies(found: list[Checkpoint]) -> list[Checkpoint]:
    """A collapse guard's kept checkpoints (``entrotrain-last-good/``, :mod:`entrotrain.callbacks.checkpoint_keeper`)
    stand in for the checkpoints a rotation deleted: one whose step a checkpoint outside that folder carries is that
    one's copy, left out."""
    own = {c.step for c in found if c.path.parent.name != KEEP_FOLDER}
    kept: dict[int | None, Checkpoint] = {}  # one per step: two guards keep one checkpoint as name and name-v1
    for c in sorted(found, key=lambda c: (len(c.path.name), natural_order(c.path.name))):  # name before name-v1
        if c.path.parent.name == KEEP_FOLDER and c.step not in own:
            kept.setdefault(c.step, c)
    return [c for c in found if c.path.parent.name != KEEP_FOLDER or kept.get(c.step) is c]


def find_checkpoints(paths: Sequence[str | Path]) -> list[Checkpoint]:
    """The checkpoints ``paths`` name (files, model folders, or folders holding them), ordered by step (those
    without a step last, by name, numbers in it by value: ``epoch=2`` before ``epoch=10``); duplicates once, and a
    Lightning checkpoint without a step in its name (``last.ckpt``) whose stored step another one's name carries is
    that one's copy: left out.

    Raises:
        EntrotrainError: a path that does not exist or holds no checkpoint, Lightning and Hugging Face checkpoints
            mixed (their batches differ), or checkpoints of several runs (one step saved in two folders).
    """
    found: dict[Path, Checkpoint] = {}
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise EntrotrainError("entrotrain inspect: " + missing_path(
                path, "Pass a checkpoint (a *.ckpt file or a Hugging Face model folder) or the folder holding them "
                "(ModelCheckpoint's dirpath, Trainer's output_dir)."
            ))
        for ckpt in _expand(path):
            found.setdefault(ckpt.path.resolve(), ckpt)
    if not found:
        raise EntrotrainError("entrotrain inspect: name at least one checkpoint (a *.ckpt file or a model folder).")
    named = {c.step for c in found.values() if saved_at(c.path) is not None}
    found = {p: c for p, c in found.items() if saved_at(c.path) is not None or c.step not in named}
    kinds = {c.kind for c in found.values()}
    if len(kinds) > 1:
        raise EntrotrainError(
            "entrotrain inspect: Lightning (*.ckpt) and Hugging Face checkpoints mixed; inspect each kind on its own."
        )
    found = _one_per_step(found)
    folders: dict[int, set[Path]] = {}
    for c in found.values():
        if c.step is not None:
            folders.setdefault(c.step, set()).add(c.path.resolve().parent)
    several = next((sorted(f) for f in folders.values() if len(f) > 1), None)
    if several is not None:  # one step saved in two folders: two runs, which one trajectory would interleave
        raise EntrotrainError(
            f"entrotrain inspect: checkpoints of several runs: the same step is saved in {several[0]} and "
            f"{several[1]}; inspect one run's folder at a time."
        )
    return sorted(found.values(), key=lambda c: (c.step is None, c.step or 0, natural_order(str(c.path))))


def _one_per_step(found: dict[Path, Checkpoint]) -> dict[Path, Checkpoint]:
    """Lightning checkpoints of one step in one folder: copies of one save (two ``ModelCheckpoint`` callbacks) are
    one, the shortest name; different weights are two runs saved into one ``dirpath`` (Lightning names the second
    run's files ``...-v1.ckpt``), which one trajectory would interleave: an error naming both."""
    by_step: dict[tuple[Path, int], list[Path]] = {}
    for path, c in found.items():
        if c.kind == "lightning" and c.step is not None:
            by_step.setdefault((path.parent, c.step), []).append(path)
    for (_, step), paths in by_step.items():
        first, *others = sorted(paths, key=lambda p: (len(p.name), natural_order(p.name)))  # name before name-v1
        for other in others:
            same = _same_weights(first, other)
            if same is None:  # unreadable: load_lightning says why when it is inspected
                continue
            if not same:
                raise EntrotrainError(
                    f"entrotrain inspect: checkpoints of several runs: step {step} is saved as {first.name} and "
                    f"{other.name} in {first.parent} with different weights (a run saved into the folder of an "
                    "earlier one; Lightning adds -v1 to the later run's names). Inspect one run's checkpoints: name "
                    "its files, e.g. `entrotrain inspect <folder>/*-v1.ckpt`, or give each run its own dirpath."
                )
            del found[other]
    return found


def _same_weights(a: Path, b: Path) -> bool | None:
    """Whether two Lightning checkpoints hold the same ``state_dict`` (read memory-mapped); ``None`` when one cannot
    be read."""
    try:
        left, right = load_checkpoint_light(a).get("state_dict"), load_checkpoint_light(b).get("state_dict")
    except Exception:  # noqa: BLE001 - load_lightning says why when it is inspected
        return None
    if not isinstance(left, dict) or not isinstance(right, dict):
        return None
    if left.keys() != right.keys():
        return False
    return all(_equal(left[k], right[k]) for k in left)


def _equal(a: Any, b: Any) -> bool:
    """Whether two ``state_dict`` entries are the same: tensors of one shape and dtype with the same values, a NaN
    where the other has a NaN included (a collapse's checkpoint can hold one); anything else (a module's
    ``_extra_state``) equal by ``==``."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        try:
            return type(a) is type(b) and bool(a == b)
        except Exception:  # noqa: BLE001 - no comparable value (e.g. a dict of tensors): not known to be the same
            return False
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b):
        return True
    return (a.is_floating_point() or a.is_complex()) and torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)


# ---------------------------------------------------------------------------------------------------- Lightning
def _import_named(class_path: str | None, imports: Sequence[str], what: str, path: Path) -> None:
    """Import the module of ``class_path`` when it is entrotrain's own or the user named it in ``imports``."""
    for module in imports:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise EntrotrainError(f"entrotrain inspect --import {module}: cannot import it ({err}).") from err
    if not class_path:
        return
    module = class_path.rpartition(".")[0]
    if module == "entrotrain" or module.startswith("entrotrain."):
        importlib.import_module(module)
        return
    if not any(module == m or module.startswith(m + ".") for m in imports):
        raise EntrotrainError(
            f"entrotrain inspect: {path} names the {what} class {class_path}; importing a module a checkpoint names "
            f"runs its code, so it is imported only when you name it: add `--import {module}` if you trust it."
        )


def load_lightning(
    path: Path, imports: Sequence[str] = (), map_location: str = "cpu", data: bool = True
) -> tuple[nn.Module, Any]:
    """The ``LightningModule`` of a Lightning checkpoint and, with ``data`` and when the checkpoint names one
    (``LightningCLI`` runs do), its ``LightningDataModule`` (else ``None``).

    Raises:
        EntrotrainError: the checkpoint cannot be read, names no module class (a checkpoint not written through
            ``LightningCLI``: use :func:`~entrotrain.integrations.snapshot.entropy_snapshot` in Python), or names a
            class outside entrotrain that ``imports`` does not cover.
    """
    from lightning.pytorch import LightningDataModule, LightningModule

    try:  # weights_only: unpickling a checkpoint's other objects runs code the file names, before any check here
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise EntrotrainError(
            f"entrotrain inspect: {path} holds objects beyond tensors and plain values, and loading them would run "
            "code the file names, so it is not loaded. If you trust it, load the model yourself and call "
            f"entrotrain.integrations.snapshot.entropy_snapshot(model, batches) ({str(err).splitlines()[-1]})."
        ) from err
    except Exception as err:  # noqa: BLE001 - a torn or foreign file: say which
        raise EntrotrainError(f"entrotrain inspect: cannot read {path} as a checkpoint ({err}).") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise EntrotrainError(f"entrotrain inspect: {path} is not a Lightning checkpoint (no state_dict).")
    hparams = checkpoint.get("hyper_parameters") or {}
    if "_class_path" not in hparams:
        raise EntrotrainError(
            f"entrotrain inspect: {path} does not name its LightningModule class (it was not written through "
            "LightningCLI / `entrotrain fit`). Load the model yourself and call "
            "entrotrain.integrations.snapshot.entropy_snapshot(model, batches)."
        )
    _import_named(hparams["_class_path"], imports, "LightningModule", path)
    data_hparams = (checkpoint.get("datamodule_hyper_parameters") or {}) if data else {}
    _import_named(data_hparams.get("_class_path"), imports, "LightningDataModule", path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's notes on upgrading the checkpoint format
        try:
            module = LightningModule.load_from_checkpoint(path, map_location=map_location, weights_only=True)
            datamodule = (LightningDataModule.load_from_checkpoint(path, weights_only=True)
                          if "_class_path" in data_hparams else None)
        except (ValueError, TypeError, RuntimeError, KeyError) as err:  # blocked, or arguments / weights mismatch
            raise EntrotrainError(f"entrotrain inspect: cannot rebuild the classes {path} names ({err}).") from err
    return module, datamodule


def lightning_batches(datamodule: Any, split: str, count: int) -> list[Any]:
    """The first ``count`` batches of ``datamodule``'s ``split`` (``"val"`` or ``"train"``) dataloader."""
    if datamodule is None:
        raise EntrotrainError(
            "entrotrain inspect: the checkpoint names no LightningDataModule (data passed to fit() directly, or a "
            "datamodule whose __init__ does not call self.save_hyperparameters(): LightningCLI then saves no class "
            "for it), so there is no data to inspect it on. Add that call, or use "
            "entrotrain.integrations.snapshot.entropy_snapshot(model, batches)."
        )
    from lightning.pytorch import LightningDataModule

    hook = "val_dataloader" if split == "val" else "train_dataloader"
    if getattr(type(datamodule), hook) is getattr(LightningDataModule, hook):
        raise EntrotrainError(
            f"entrotrain inspect: {type(datamodule).__name__} defines no {hook}"
            + ("; inspect on its training batches: --split train." if split == "val" else ".")
        )
    datamodule.prepare_data()
    datamodule.setup("fit")  # the stage its validation batches came from in training (many build them only then)
    loader = datamodule.val_dataloader() if split == "val" else datamodule.train_dataloader()
    if isinstance(loader, (list, tuple)):
        loader = loader[0]
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            break
    if not batches:
        raise EntrotrainError(f"entrotrain inspect: the datamodule's {split} dataloader gave no batch.")
    return batches


def lightning_forward(module: Any) -> Any:
    """``forward(model, batch)`` for :func:`~entrotrain.integrations.snapshot.entropy_snapshot` on a
    ``LightningModule``: its ``validation_step`` (what it computes on held-out data, loss included) when it defines
    one, called as the module's forward, after its ``on_validation_epoch_start``; else its ``forward``. ``self.log``
    calls outside a Trainer are silenced."""
    from lightning.pytorch import LightningModule

    own = type(module).validation_step is not LightningModule.validation_step
    index = iter(range(1 << 62))

    def forward(model: Any, batch: Any) -> Any:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*self\.log\(\).*")
            if not own:
                from entrotrain.integrations.snapshot import call_model

                return call_model(model, batch)
            # called through the module itself, so the hooks a monitor puts on the root module's forward (the
            # prediction monitor's batch watch) see the step, as they see training_step's self(...) in a loop
            batch_idx = next(index)
            if batch_idx == 0:  # as the Trainer's validation loop: a step may use state the epoch's start creates
                model.on_validation_epoch_start()
            model.forward = functools.partial(_step_once, model)
            try:
                return model(batch, batch_idx)
            finally:
                model.__dict__.pop("forward", None)

    return forward


#: The forward hooks of a module (torch's own attributes): hidden from a ``self(...)`` inside the step they saw.
_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
          "_forward_hooks_always_called")


def _step_once(model: Any, batch: Any, batch_idx: int) -> Any:
    """``model.validation_step`` run as ``model``'s forward: a ``self(x)`` inside it (Lightning's idiom) runs the
    module's own forward, not the step again, and the root module's hooks, which saw this call, do not see it twice."""
    del model.forward
    saved = {name: getattr(model, name) for name in _HOOKS if hasattr(model, name)}
    for name, hooks in saved.items():
        setattr(model, name, type(hooks)())
    try:
        return model.validation_step(batch, batch_idx)
    finally:
        for name, hooks in saved.items():
            setattr(model, name, hooks)


# ---------------------------------------------------------------------------------------------------- Hugging Face
def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def load_hf(path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """A Hugging Face model folder, from disk only, with SDPA attention: ``AutoModelForCausalLM`` when its config
    names a causal-LM architecture (``*ForCausalLM``, ``GPT2LMHeadModel``, ...: its loss is then the language-modelling
    loss), else ``AutoModel``.

    Raises:
        EntrotrainError: the folder's config or weights cannot be read (a torn save, an unknown model type), or it
            holds an encoder-decoder model (a text gives no decoder inputs)."""
    try:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    except ImportError as err:
        raise EntrotrainError(
            "entrotrain inspect: Hugging Face checkpoints need transformers: pip install 'entrotrain[hf]'."
        ) from err
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise EntrotrainError(
            f"entrotrain inspect: cannot read the model config in {path} ({_first_line(err)})."
        ) from err
    if getattr(config, "is_encoder_decoder", False):
        raise EntrotrainError(
            f"entrotrain inspect: {path} is an encoder-decoder model ({config.model_type}); inspect runs decoder-only "
            "and encoder models on windows of a text. Give it decoder inputs yourself: "
            "entrotrain.integrations.snapshot.entropy_snapshot(model, batches)."
        )
    lm_classes = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ((v,) if isinstance(v, str) else v)}
    causal = any(a.endswith("ForCausalLM") or a in lm_classes for a in (config.architectures or ()))
    auto = AutoModelForCausalLM if causal else AutoModel
    try:
        try:
            model = auto.from_pretrained(path, local_files_only=True, attn_implementation="sdpa", dtype=dtype)
        except (ValueError, ImportError):  # a model without an SDPA implementation: eager is tapped too
            model = auto.from_pretrained(path, local_files_only=True, attn_implementation="eager", dtype=dtype)
    except (OSError, ValueError, ImportError, RuntimeError) as err:  # no weights, or weights that do not fit
        raise EntrotrainError(f"entrotrain inspect: cannot load the model in {path} ({_first_line(err)}).") from err
    model._entrotrain_causal = causal  # type: ignore[attr-defined]
    return model.to(device)


#: What ``save_pretrained`` of a tokenizer writes (any one of them).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")


def load_hf_tokenizer(path: Path) -> Any:
    """The tokenizer saved in ``path`` (or its parent: ``Trainer`` saves it in ``output_dir`` too), from disk only."""
    from transformers import AutoTokenizer

    for folder in (path, path.parent):
        if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
            continue  # AutoTokenizer builds an empty tokenizer from config.json alone (transformers 5)
        try:
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, TypeError):
            continue
    raise EntrotrainError(
        f"entrotrain inspect: no tokenizer saved in {path} or {path.parent}; pass --tokenizer FOLDER (one where "
        "tokenizer.save_pretrained wrote it)."
    )


def text_batches(
    tokenizer: Any, text: str, seq_len: int, batch_size: int, count: int, labels: bool, device: str = "cpu"
) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of ``batch_size`` windows of ``seq_len`` tokens of ``text``, spread evenly over it (the same
    windows for every checkpoint): ``input_ids``, an all-ones ``attention_mask`` and, with ``labels``, ``labels``
    (the causal LM's loss)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    ids = torch.as_tensor(ids, dtype=torch.long)
    windows = batch_size * count
    if ids.numel() < seq_len:
        raise EntrotrainError(
            f"entrotrain inspect --text: the text has {ids.numel()} tokens, fewer than --seq-len {seq_len}; give a "
            "longer text or a smaller --seq-len."
        )
    starts = torch.linspace(0, ids.numel() - seq_len, windows).round().long()
    rows = torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
    batches = []
    for chunk in rows.split(batch_size):
        chunk = chunk.to(device)
        batch = {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
        if labels:
            batch["labels"] = chunk
        batches.append(batch)
    return batches
