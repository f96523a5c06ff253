r"""``entrotrain inspect CHECKPOINT ...``: the entropy of saved checkpoints, so a collapse can be found and dated after
the fact, in a run that trained without monitors.

::

    entrotrain inspect runs/ckpts/                  # every *.ckpt below, in step order (Lightning / entrotrain fit)
    entrotrain inspect hf_out --text corpus.txt     # every hf_out/checkpoint-N (HF Trainer), on windows of a text

    checkpoint                      step 50   step 100   step 200   step 400   trend
    entropy/attn_norm/min            0.0750     0.0122     0.0090     0.0060   █▂▁▁
    entropy/attn/collapse_frac       0.0 %     25.0 %     75.0 %     93.8 %   ▁▃▆█
    ...
    Heads whose attention fell most (normalised entropy, step 50 → step 400):
      L3/H2  model.blocks.3.attn   0.612 → 0.004
    Collapse first shows at step 100: 4 of 16 heads below 0.1 (0 at step 50).

Each checkpoint's model is run in eval mode on the same batches (a Lightning checkpoint: the first ``--batches``
validation batches of the datamodule it names, through its ``validation_step``; a Hugging Face folder: windows of
``--text`` tokenised by its own tokenizer) with :func:`~entrotrain.integrations.snapshot.entropy_snapshot`: the
monitors of training and their keys (the attention monitor; ``--representation GLOB`` adds the representation
monitor on those modules), plus ``loss`` (what ``validation_step`` or the causal LM returns). ``--json`` prints every
value; ``--record DIR`` writes a run record with one step per checkpoint, for ``entrotrain report`` and
``entrotrain status``; "what to try" is printed as at the end of a run.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from entrotrain.dashboards.run_reader import natural_order
from entrotrain.errors import EntrotrainError, TapError

__all__ = ["DEFAULT_KEYS", "collapse_onset", "fallen_heads", "inspect_main", "snapshot_table"]

#: The keys tabulated by default (globs, in this order); ``--keys`` replaces them.
DEFAULT_KEYS = (
    "loss",
    "entropy/attn_norm/min", "entropy/attn_norm/p05", "entropy/attn_norm/mean",
    "entropy/attn/collapse_frac", "entropy/attn/overload_frac", "entropy/attn_norm/L*/mean",
    "entropy/repr/*/rankme", "entropy/repr/*/effective_rank", "entropy/repr/*/matrix_entropy",
    "entropy/pred/train/mean", "entropy/pred/train/top1_prob", "entropy/pred/train/below_floor_frac",
    "entropy/router/load_entropy_norm_min", "entropy/router/dead_frac_max",
    "entropy/*/nonfinite",
)
_HEAD = re.compile(r"^entropy/attn_norm/(L\d+)/(H\d+)$")


def _keys(results: Sequence[tuple[Any, Any]], patterns: Sequence[str]) -> list[str]:
    present = {key for _, shot in results for key in shot.metrics}
    keys: list[str] = []
    for pattern in patterns:
        for key in sorted((k for k in present if fnmatch.fnmatchcase(k, pattern)), key=natural_order):
            if key in keys:
                continue
            if key.endswith("/nonfinite") and pattern == "entropy/*/nonfinite":  # shown only when there was any
                if not any(shot.metrics.get(key, 0) for _, shot in results):
                    continue
            keys.append(key)
    return keys


def _columns(n: int, most: int) -> list[int]:
    """At most ``most`` of ``n`` column indices, evenly spread, first and last included."""
    if n <= most:
        return list(range(n))
    return sorted({round(i * (n - 1) / (most - 1)) for i in range(most)})


def snapshot_table(
    results: Sequence[tuple[Any, Any]], patterns: Sequence[str] = DEFAULT_KEYS, columns: int = 6, rows: int = 40
) -> list[str]:
    """The text table: one row per key matching ``patterns``, one column per checkpoint (at most ``columns``, evenly
    spread, first and last kept) and a trend over all of them."""
    from entrotrain.dashboards.report import value_format
    from entrotrain.dashboards.terminal_status import sparkline

    keys = _keys(results, patterns)
    if not keys:
        return ["(no key matches " + " ".join(patterns) + ")"]
    shown = _columns(len(results), columns)
    name_width = max(len("checkpoint"), *(len(k) for k in keys[:rows]))
    labels = [results[i][0].label for i in shown]
    cell = max(9, *(len(label) for label in labels))
    lines = ["checkpoint".ljust(name_width) + "".join(label.rjust(cell + 1) for label in labels) + "   trend"]
    for key in keys[:rows]:
        fmt = value_format(key)
        values = [results[i][1].metrics.get(key, math.nan) for i in range(len(results))]
        cells = "".join(("—" if not math.isfinite(values[i]) else fmt(values[i])).rjust(cell + 1) for i in shown)
        lines.append(key.ljust(name_width) + cells + "   " + sparkline(values, width=min(24, len(values))))
    if len(keys) > rows:
        lines.append(f"… {len(keys) - rows} more keys (--rows, --keys GLOB, or --json for all)")
    if len(shown) < len(results):
        lines.append(f"({len(shown)} of {len(results)} checkpoints shown, evenly spread; the trend has them all)")
    return lines


def fallen_heads(results: Sequence[tuple[Any, Any]], top: int = 5) -> list[str]:
    """The heads whose normalised attention entropy fell most from the first checkpoint to the last (falls of at
    least 0.05), with their module names."""
    if len(results) < 2:
        return []
    (first_ckpt, first), (last_ckpt, last) = results[0], results[-1]
    falls = []
    for key, before in first.metrics.items():
        match = _HEAD.match(key)
        after = last.metrics.get(key, math.nan)
        if match and math.isfinite(before) and math.isfinite(after) and before - after >= 0.05:
            falls.append((before - after, match.group(1), match.group(2), before, after))
    if not falls:
        return []
    falls.sort(key=lambda f: (-f[0], natural_order(f[1] + f[2])))
    sites = {**first.sites, **last.sites}
    width = max(len(site) for site in (sites.get(f[1], "") for f in falls[:top]))
    lines = [f"Heads whose attention fell most (normalised entropy, {first_ckpt.label} → {last_ckpt.label}):"]
    for _, layer, head, before, after in falls[:top]:
        lines.append(f"  {layer}/{head:<4} {sites.get(layer, '').ljust(width)}   {before:.3f} → {after:.3f}")
    if len(falls) > top:
        lines.append(f"  … and {len(falls) - top} more heads fell by 0.05 or more.")
    return lines


def collapse_onset(results: Sequence[tuple[Any, Any]], threshold: float) -> list[str]:
    """The first checkpoint at which more heads are collapsed (normalised entropy below ``threshold``) than at the
    first one: the collapse dated to within two checkpoints."""
    shares = [shot.metrics.get("entropy/attn/collapse_frac", math.nan) for _, shot in results]
    heads = [sum(1 for key in shot.metrics if _HEAD.match(key)) for _, shot in results]
    if len(results) < 2 or not math.isfinite(shares[0]):
        return []
    for i in range(1, len(results)):
        if math.isfinite(shares[i]) and shares[i] > shares[0]:
            before = [f"{round(shares[j] * heads[j])} at {results[j][0].label}" for j in sorted({0, i - 1})
                      if math.isfinite(shares[j])]
            verb = "first shows" if shares[0] == 0 else "grows"  # some heads may be collapsed from the first one on
            return [
                f"Collapse {verb} at {results[i][0].label}: {round(shares[i] * heads[i])} of {heads[i]} heads "
                f"below {threshold:g} ({', '.join(before)})."
            ]
    return []


def _monitors(args: argparse.Namespace, shift_labels: bool = False) -> list[Any]:
    from entrotrain.callbacks.attention_monitor import AttentionEntropyMonitor
    from entrotrain.callbacks.prediction_monitor import PredictionEntropyMonitor
    from entrotrain.callbacks.representation_monitor import RepresentationEntropyMonitor
    from entrotrain.callbacks.router_monitor import RouterEntropyMonitor

    # with other monitors asked for, a model without attention (an MLP encoder) is inspected by them: a warning
    strict = not (args.representation or args.prediction or args.router)
    monitors: list[Any] = [AttentionEntropyMonitor(collapse_threshold=args.collapse_threshold, strict=strict)]
    if args.representation:
        monitors.append(RepresentationEntropyMonitor(include=list(args.representation), stage="train"))
    if args.prediction:  # the output head's predictive entropy on the inspected batches (keys entropy/pred/train/*)
        monitors.append(PredictionEntropyMonitor(
            source="head", head=args.prediction_head, probe_batches=0, positions=0, shift_labels=shift_labels,
            print_summary=False, log_media=False,
        ))
    if args.router:
        include = None if args.router == "auto" else [args.router]
        monitors.append(RouterEntropyMonitor(include=include, top_k=args.router_top_k, print_summary=False,
                                             log_media=False))
    return monitors


def _device(name: str) -> Any:
    """``--device`` as a ``torch.device`` this torch can use."""
    import torch

    from entrotrain._validation import check_device

    device = check_device(name, "entrotrain inspect --device", none_ok=False)
    usable = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(device.type, lambda: True)
    if not usable():
        raise EntrotrainError(f"entrotrain inspect --device {name}: this torch sees no {device.type} device; use "
                              "--device cpu, or run where one is.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise EntrotrainError(f"entrotrain inspect --device {name}: there are {torch.cuda.device_count()} CUDA devices "
                              "(cuda:0 ...).")
    return device


def _snapshot(ckpt: Any, model: Any, batches: list[Any], monitors: list[Any], forward: Any = None) -> Any:
    """:func:`~entrotrain.integrations.snapshot.entropy_snapshot` of one checkpoint; the model failing on the batches
    (a checkpoint of another configuration than the first, whose data they are) is an error naming it."""
    from entrotrain.integrations.snapshot import entropy_snapshot

    try:
        return entropy_snapshot(model, batches, monitors, forward=forward)
    except (EntrotrainError, TapError):
        raise
    except Exception as err:  # noqa: BLE001 - the model's own error, raised from a checkpoint's code: say which
        raise EntrotrainError(
            f"entrotrain inspect: {ckpt.path} fails on the batches ({type(err).__name__}: {err}). They are built once, "
            "from the first checkpoint's data or tokenizer: inspect checkpoints of one model configuration together."
        ) from err


def _run(args: argparse.Namespace) -> tuple[list[tuple[Any, Any]], str]:
    """Every checkpoint's snapshot, in step order, and a line saying what was run on what."""
    import logging

    from entrotrain.integrations import checkpoint_sources as sources

    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)  # the monitors' site lists
    device = _device(args.device)
    checkpoints = sources.find_checkpoints(args.checkpoints)
    results: list[tuple[Any, Any]] = []
    if checkpoints[0].kind == "lightning":
        from lightning.fabric.utilities.apply_func import move_data_to_device

        if args.text is not None:
            raise EntrotrainError("entrotrain inspect --text is for Hugging Face checkpoints; a Lightning checkpoint "
                                  "is inspected on the data of the datamodule it names.")
        batches = None
        for ckpt in checkpoints:
            module, datamodule = sources.load_lightning(ckpt.path, args.imports, data=batches is None)
            if batches is None:
                batches = sources.lightning_batches(datamodule, args.split, args.batches)
                what = (f"{len(batches)} {'validation' if args.split == 'val' else 'training'} batches of "
                        f"{type(datamodule).__name__}, through {type(module).__name__}")
            module = module.to(device)
            moved = [move_data_to_device(b, device) for b in batches]
            results.append((ckpt, _snapshot(ckpt, module, moved, _monitors(args), sources.lightning_forward(module))))
    else:
        if args.text is None:
            raise EntrotrainError(
                "entrotrain inspect: Hugging Face checkpoints are inspected on text: pass --text FILE (held-out text "
                "in the model's language; windows of it are tokenised by the checkpoint's own tokenizer)."
            )
        try:
            text = Path(args.text).read_text(errors="replace")
        except OSError as err:
            raise EntrotrainError(
                f"entrotrain inspect --text: cannot read {args.text} ({err.strerror or err})."
            ) from err
        tokenizer = sources.load_hf_tokenizer(Path(args.tokenizer) if args.tokenizer else checkpoints[0].path)
        batches = None
        for ckpt in checkpoints:
            model = sources.load_hf(ckpt.path, device=str(device))
            if batches is None:
                limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions",
                                                                                          None)
                seq_len = min(args.seq_len, limit) if limit else args.seq_len
                batches = sources.text_batches(tokenizer, text, seq_len, args.batch_size, args.batches,
                                               labels=model._entrotrain_causal, device=str(device))
                what = f"{len(batches)} batches of {args.batch_size} × {seq_len} tokens of {args.text}"
                top = max(int(b["input_ids"].max()) for b in batches)  # the same batches for every checkpoint
            vocab = getattr(model.config, "vocab_size", None)
            if vocab is not None and top >= vocab:
                raise EntrotrainError(
                    f"entrotrain inspect: the tokenizer gives token ids up to {top}, but {ckpt.path} has vocab_size "
                    f"{vocab}: pass --tokenizer FOLDER, where this model's own tokenizer is saved."
                )
            monitors = _monitors(args, shift_labels=model._entrotrain_causal)  # HF labels are the inputs
            results.append((ckpt, _snapshot(ckpt, model, batches, monitors)))
    kind = "Lightning" if checkpoints[0].kind == "lightning" else "Hugging Face"
    return results, f"{len(results)} {kind} checkpoint{'s' * (len(results) != 1)}, {what}, eval mode, {args.device}"


def _write_record(results: Sequence[tuple[Any, Any]], folder: Path, args: argparse.Namespace) -> Path:
    """A run record with one step per checkpoint (its step, or its rank when steps are missing or repeat)."""
    from entrotrain.dashboards.run_record import RunRecordLogger, unique_version

    steps = [ckpt.step for ckpt, _ in results]
    if None in steps or len(set(steps)) != len(steps):
        steps = list(range(len(results)))
    # a second inspect in the same second gets its own folder
    record = RunRecordLogger(folder, version=unique_version(folder / "records", "inspect"), run_name="inspect")
    record.log_hyperparams({"inspect/checkpoints": [str(c.path) for c, _ in results], "inspect/split": args.split,
                            "inspect/batches": results[0][1].batches})
    record.log_thresholds(results[0][1].thresholds)
    for step, (_, shot) in zip(steps, results):
        record.log_metrics({k: v for k, v in shot.metrics.items() if math.isfinite(v)}, step=step)
        record.log_arrays(shot.arrays, step)
    record.finalize("success")
    return Path(record.log_dir)


def _json(results: Sequence[tuple[Any, Any]]) -> str:
    def number(v: float) -> float | None:
        return v if math.isfinite(v) else None

    return json.dumps([
        {"path": str(ckpt.path), "step": ckpt.step, "batches": shot.batches, "sites": shot.sites,
         "metrics": {k: number(v) for k, v in sorted(shot.metrics.items(), key=lambda kv: natural_order(kv[0]))}}
        for ckpt, shot in results
    ], indent=1)


def inspect_main(argv: list[str]) -> int:
    """``entrotrain inspect`` on the command line; errors go to stderr with exit code 2."""
    parser = argparse.ArgumentParser(
        prog="entrotrain inspect",
        description="The entropy of saved checkpoints (attention per head, optionally representations), as the "
        "monitors would have logged it: find and date a collapse after the fact.",
    )
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                        help="Lightning *.ckpt files, Hugging Face model folders, or folders holding them")
    parser.add_argument("--batches", type=int, default=8, help="batches to run each checkpoint on (default 8)")
    parser.add_argument("--split", choices=("val", "train"), default="val",
                        help="Lightning: the datamodule's validation (default) or training batches")
    parser.add_argument("--text", default=None, metavar="FILE", help="Hugging Face: the text to run on")
    parser.add_argument("--tokenizer", default=None, metavar="FOLDER",
                        help="Hugging Face: where the tokenizer is saved (default: the checkpoint, or its parent)")
    parser.add_argument("--seq-len", type=int, default=256, help="Hugging Face: tokens per window (default 256)")
    parser.add_argument("--batch-size", type=int, default=8, help="Hugging Face: windows per batch (default 8)")
    parser.add_argument("--representation", action="append", default=None, metavar="GLOB",
                        help="also the representation monitor on these modules, a glob (e.g. 'model.blocks.*'; repeat "
                        "for more)")
    parser.add_argument("--router", default=None, metavar="GLOB",
                        help="also the MoE router monitor on these router modules ('auto': HF *TopKRouter / MoE 'gate' "
                        "layers; e.g. '**.router'): entropy/router/* (expert load entropy, dead experts)")
    parser.add_argument("--router-top-k", type=int, default=None, metavar="K",
                        help="with --router: experts picked per token, when the model does not say (HF configs do)")
    parser.add_argument("--prediction-head", default="**.lm_head", metavar="GLOB",
                        help="with --prediction: the output head's module, a glob (default '**.lm_head')")
    parser.add_argument("--prediction", action="store_true",
                        help="also the predictive entropy of the output head (--prediction-head): "
                        "entropy/pred/train/* on the inspected batches")
    parser.add_argument("--collapse-threshold", type=float, default=0.1,
                        help="a head is collapsed below this normalised entropy (default 0.1)")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first: a checkpoint naming a class outside entrotrain needs it")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--keys", action="append", default=None, metavar="GLOB",
                        help="a key to tabulate, as a glob (repeat for more)")
    parser.add_argument("--columns", type=int, default=6, help="at most this many checkpoints side by side")
    parser.add_argument("--rows", type=int, default=40, help="at most this many keys")
    parser.add_argument("--json", action="store_true", help="print every value of every checkpoint as JSON")
    parser.add_argument("--record", default=None, metavar="FOLDER",
                        help="write a run record (one step per checkpoint) under FOLDER for entrotrain report/status")
    args = parser.parse_args(argv)
    if min(args.batches, args.seq_len, args.batch_size, args.columns, args.rows) < 1 or args.columns < 2:
        parser.error("--batches, --seq-len, --batch-size and --rows must be at least 1, --columns at least 2")
    try:
        results, what = _run(args)
        if args.json:
            if args.record:
                _write_record(results, Path(args.record), args)
            print(_json(results))
            return 0
        with tempfile.TemporaryDirectory() as scratch:
            record = _write_record(results, Path(args.record if args.record else scratch), args)
            from entrotrain.dashboards.remedies import what_to_try

            remedies = what_to_try(record)
        lines = [f"entrotrain inspect: {what}", ""]
        lines += snapshot_table(results, args.keys or DEFAULT_KEYS, args.columns, args.rows)
        for block in (fallen_heads(results), collapse_onset(results, args.collapse_threshold), remedies):
            if block:
                lines += ["", *block]
        if args.record:
            lines += ["", f"entrotrain inspect: run record {record}   (entrotrain report {record})"]
        print("\n".join(lines))
    except (EntrotrainError, TapError) as err:  # a model whose attention cannot be tapped: the tap's message
        print(f"entrotrain inspect: error: {str(err).removeprefix('entrotrain inspect: ')}", file=sys.stderr)
        raise SystemExit(2) from err
    return 0
