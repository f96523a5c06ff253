"""``entrotrain inspect``: checkpoints found and ordered, loaded safely, run on the same batches, and the numbers equal
an independent float64 brute force (Lightning) or ``entropy_snapshot`` on the model ``transformers`` loads (HF); the
table, the fallen heads and the collapse onset on hand-built snapshots; errors exit 2 with a message."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from entrotrain.cli import main
from entrotrain.errors import EntrotrainError
from entrotrain.integrations.checkpoint_sources import Checkpoint, find_checkpoints
from entrotrain.integrations.inspect_checkpoints import collapse_onset, fallen_heads, snapshot_table
from entrotrain.integrations.snapshot import EntropySnapshot, entropy_snapshot
from tests.helpers.inspect_models import char_tokenizer, perturb, rewrite_checkpoint, tiny_gpt2, tinygpt_brute

pytestmark = pytest.mark.usefixtures("one_thread")

OUTSIDE = "tests.helpers.inspect_outside"  # never imported by this file: only `--import` may import it


# ---------------------------------------------------------------------------------------------------- helpers
def inspect(capsys, *argv: str) -> str:
    capsys.readouterr()
    main(["inspect", *map(str, argv)])
    return capsys.readouterr().out


def inspect_json(capsys, *argv: str) -> list[dict]:
    return json.loads(inspect(capsys, *argv, "--json"))


def inspect_error(capsys, *argv: str) -> str:
    """``entrotrain inspect`` refuses: exit code 2, one error line on stderr, no traceback. Returns stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", *map(str, argv)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "entrotrain inspect: error:" in err and "Traceback" not in err, err
    return err


def _ckpt(steps_dir: Path, step: int) -> Path:
    return next(steps_dir.glob(f"*step={step}.ckpt"))


# ---------------------------------------------------------------------------------------------------- Lightning run
@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory, one_thread) -> Path:
    """`entrotrain fit --recipe attention_collapse` for 4 steps of a 2-layer TinyGPT, a checkpoint every 2 steps."""
    root = tmp_path_factory.mktemp("fit")
    ckpts = root / "ckpts"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("WANDB_MODE", "disabled")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_DIR", str(root / "wandb"))
        main([
            "fit", "--recipe", "attention_collapse", "--trainer.max_steps", "4",
            "--trainer.enable_checkpointing", "true", "--trainer.logger", "false",
            "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps", "2",
            "--trainer.callbacks.save_top_k", "-1", "--trainer.callbacks.dirpath", str(ckpts),
            "--trainer.default_root_dir", str(root / "runs"), "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false",
            "--model.init_args.n_layer", "2", "--model.init_args.n_embd", "32", "--model.init_args.block_size", "16",
            "--data.init_args.block_size", "16", "--data.init_args.batch_size", "4",
            "--data.init_args.max_chars", "20000",
        ])
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]
    return ckpts


@pytest.fixture(scope="module")
def lightning_json(lightning_run) -> list[dict]:
    import contextlib  # module scope has no capsys: read main's stdout ourselves
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        main(["inspect", str(lightning_run), "--json", "--batches", "2"])
    return json.loads(buffer.getvalue())


def test_lightning_numbers_equal_float64_brute_force(lightning_json):
    assert [r["step"] for r in lightning_json] == [2, 4]
    for result in lightning_json:
        brute, loss = tinygpt_brute(Path(result["path"]), batches=2)
        assert result["batches"] == 2
        assert result["sites"] == {"L0": "model.blocks.0.attn", "L1": "model.blocks.1.attn"}
        assert len(brute) == 2 * 2 * 4  # 2 layers × 4 heads, nats and normalised
        for key, value in brute.items():
            assert result["metrics"][key] == pytest.approx(value, abs=1e-5), key
        assert result["metrics"]["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6)
    # the checkpoints differ, so the order is seen in the numbers
    assert lightning_json[0]["metrics"]["loss"] != lightning_json[1]["metrics"]["loss"]


def test_lightning_text_table(lightning_run, lightning_json, capsys):
    from entrotrain.dashboards.report import value_format

    lines = inspect(capsys, lightning_run, "--batches", "2").splitlines()
    assert lines[0].startswith(
        "entrotrain inspect: 2 Lightning checkpoints, 2 validation batches of CharCorpusDataModule, through "
        "LanguageModelingTask, eval mode, cpu"
    )
    start = next(i for i, line in enumerate(lines) if line.startswith("checkpoint "))
    assert lines[start].split() == ["checkpoint", "step", "2", "step", "4", "trend"]
    rows = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        rows[line.split()[0]] = line
    assert list(rows)[:4] == ["loss", "entropy/attn_norm/min", "entropy/attn_norm/p05", "entropy/attn_norm/mean"]
    assert {"entropy/attn_norm/L0/mean", "entropy/attn_norm/L1/mean", "entropy/attn/collapse_frac"} <= set(rows)
    assert "entropy/attn/nonfinite" not in rows  # zero: not shown
    for key, line in rows.items():
        fmt = value_format(key)
        cells = [fmt(r["metrics"][key]) for r in lightning_json]
        assert " ".join(cells) in " ".join(line.split()), (key, line)


def test_record_is_a_run_record_with_the_checkpoint_steps(lightning_run, lightning_json, tmp_path, capsys):
    from entrotrain.dashboards.run_reader import load_run

    out = inspect(capsys, lightning_run, "--batches", "2", "--record", tmp_path / "rec")
    line = next(line for line in out.splitlines() if "run record" in line)
    folder = Path(line.split("run record ")[1].split()[0])
    assert folder.is_relative_to(tmp_path / "rec")
    run = load_run(folder)
    steps, values = run.scalars["loss"]
    assert steps.tolist() == [2, 4]
    assert values.tolist() == pytest.approx([r["metrics"]["loss"] for r in lightning_json])
    assert run.scalars["entropy/attn_norm/L1/H3"][0].tolist() == [2, 4]
    capsys.readouterr()
    main(["status", str(folder)])
    assert "inspect" in capsys.readouterr().out


def test_record_with_json_is_written_too(lightning_run, tmp_path, capsys):
    results = inspect_json(capsys, lightning_run, "--batches", "1", "--record", tmp_path / "rec")
    assert [r["step"] for r in results] == [2, 4]
    records = list((tmp_path / "rec").glob("*/*/meta.json"))
    assert len(records) == 1, "--record was ignored with --json"


def test_two_records_in_the_same_second_do_not_mix(lightning_run, tmp_path, capsys, monkeypatch):
    from entrotrain.dashboards.run_reader import load_run
    from entrotrain.dashboards import run_record

    monkeypatch.setattr(run_record.time, "strftime", lambda fmt, *a: "20260101-000000")  # one second for both
    folders = []
    for _ in range(2):
        out = inspect(capsys, lightning_run, "--batches", "1", "--keys", "loss", "--record", tmp_path / "rec")
        folders.append(Path(out.split("run record ")[1].split()[0]))
    assert folders[0] != folders[1]
    for folder in folders:
        assert load_run(folder).scalars["loss"][0].tolist() == [2, 4]


# ---------------------------------------------------------------------------------------------------- finding
def _touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_lightning_files_ordered_by_step_last_ckpt_last(tmp_path):
    for name in ("a/epoch=1-step=10.ckpt", "epoch=0-step=2.ckpt", "b/c/last.ckpt", "epoch=0-step=4-v1.ckpt"):
        _touch(tmp_path / name)
    _touch(tmp_path / "notes.txt")
    found = find_checkpoints([tmp_path])
    assert [(c.path.name, c.step, c.kind) for c in found] == [
        ("epoch=0-step=2.ckpt", 2, "lightning"), ("epoch=0-step=4-v1.ckpt", 4, "lightning"),
        ("epoch=1-step=10.ckpt", 10, "lightning"), ("last.ckpt", None, "lightning"),
    ]
    assert found[-1].label == "last.ckpt" and found[0].label == "step 2"


def test_names_without_a_step_in_natural_order(tmp_path):
    for name in ("epoch=10.ckpt", "epoch=2.ckpt", "epoch=1.ckpt"):
        _touch(tmp_path / name)
    assert [c.path.name for c in find_checkpoints([tmp_path])] == ["epoch=1.ckpt", "epoch=2.ckpt", "epoch=10.ckpt"]


def test_hf_checkpoint_folders_by_step_and_duplicates_once(tmp_path):
    for step in (10, 3, 200):
        _touch(tmp_path / f"out/checkpoint-{step}/config.json", "{}")
    _touch(tmp_path / "out/runs/events.txt")
    found = find_checkpoints([tmp_path / "out", tmp_path / "out/checkpoint-3", tmp_path / "out/../out/checkpoint-10"])
    assert [(c.path.name, c.step, c.kind) for c in found] == [
        ("checkpoint-3", 3, "hf"), ("checkpoint-10", 10, "hf"), ("checkpoint-200", 200, "hf")
    ]


def test_a_kept_hf_checkpoint_being_linked_is_not_listed(tmp_path):
    """A collapse guard links a kept folder checkpoint aside (``checkpoint-20.<run>.entrotrain-copy``) and renames
    it into place; one a crash left there (part of the files) was listed, and inspected, as checkpoint 20."""
    _touch(tmp_path / "out/checkpoint-10/config.json", "{}")
    _touch(tmp_path / "out/entrotrain-last-good/checkpoint-20.0123456789ab.7.99.abc.entrotrain-copy/config.json", "{}")
    assert [c.path.name for c in find_checkpoints([tmp_path / "out"])] == ["checkpoint-10"]


def test_trainer_output_dir_with_final_model_expands_to_its_checkpoints(tmp_path):
    # HF Trainer: output_dir/checkpoint-N during training, and trainer.save_model() writes output_dir itself
    _touch(tmp_path / "out/config.json", "{}")
    for step in (5, 10):
        _touch(tmp_path / f"out/checkpoint-{step}/config.json", "{}")
    found = find_checkpoints([tmp_path / "out"])
    assert [c.path.name for c in found] == ["checkpoint-5", "checkpoint-10", "out"]


def test_file_and_its_folder_once(tmp_path):
    ckpt = _touch(tmp_path / "epoch=0-step=2.ckpt")
    assert [c.path for c in find_checkpoints([ckpt, tmp_path, tmp_path / "." / ckpt.name])] == [ckpt]


@pytest.mark.parametrize("case", ["missing", "empty", "mixed", "not_a_checkpoint"])
def test_finding_errors(tmp_path, capsys, case):
    if case == "missing":
        paths, message = [tmp_path / "nope"], "does not exist"
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        paths, message = [tmp_path / "empty"], "ModelCheckpoint"
    elif case == "mixed":
        paths = [_touch(tmp_path / "l/step=2.ckpt"), _touch(tmp_path / "h/checkpoint-3/config.json", "{}").parent]
        message = "mixed"
    else:
        paths, message = [_touch(tmp_path / "model.safetensors")], "neither a Lightning checkpoint"
    with pytest.raises(EntrotrainError, match=message):
        find_checkpoints(paths)
    assert message in inspect_error(capsys, *paths)


# ---------------------------------------------------------------------------------------------------- security
def _with_class(src: Path, dst: Path, key: str, cls: str) -> Path:
    """A copy of checkpoint ``src`` at ``dst`` whose ``key`` (``hyper_parameters`` or
    ``datamodule_hyper_parameters``) names the class ``cls`` of the module outside entrotrain."""
    checkpoint = torch.load(src, map_location="cpu", weights_only=True)
    return rewrite_checkpoint(src, dst, **{key: dict(checkpoint[key], _class_path=f"{OUTSIDE}.{cls}")})


def _outside(lightning_run: Path, tmp_path: Path, which: str) -> Path:
    key, cls = (("hyper_parameters", "OutsideTask") if which == "module"
                else ("datamodule_hyper_parameters", "ListValData"))
    return _with_class(_ckpt(lightning_run, 2), tmp_path / which / "epoch=0-step=2.ckpt", key, cls)


@pytest.mark.parametrize("which", ["module", "datamodule"])
def test_class_outside_entrotrain_needs_import(lightning_run, lightning_json, tmp_path, capsys, which):
    ckpt = _outside(lightning_run, tmp_path, which)
    imported_before = OUTSIDE in sys.modules
    err = inspect_error(capsys, ckpt, "--batches", "2")
    assert f"--import {OUTSIDE}" in err and ("OutsideTask" in err or "ListValData" in err)
    if not imported_before:
        assert OUTSIDE not in sys.modules  # refused before importing it
    results = inspect_json(capsys, ckpt, "--batches", "2", "--import", OUTSIDE)
    expected = lightning_json[0]["metrics"]  # same weights, same batches (ListValData: its first loader)
    assert results[0]["metrics"].keys() == expected.keys()
    for key, value in expected.items():
        assert results[0]["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_checkpoint_pickle_runs_no_code(lightning_run, tmp_path, capsys):
    from tests.helpers.inspect_models import OpensAFile

    marker = tmp_path / "code_ran"
    ckpt = rewrite_checkpoint(_ckpt(lightning_run, 2), tmp_path / "evil/step=2.ckpt", extra=OpensAFile(marker))
    inspect_error(capsys, ckpt, "--batches", "1")
    assert not marker.exists()


def test_unknown_import_is_an_error(lightning_run, capsys):
    assert "no_such_module_xyz" in inspect_error(capsys, lightning_run, "--import", "no_such_module_xyz")


# ---------------------------------------------------------------------------------------------------- Lightning odd
def test_a_checkpoint_with_more_layers_shows_dashes(lightning_run, tmp_path, capsys):
    from entrotrain.tasks import LanguageModelingTask

    src = _ckpt(lightning_run, 4)
    checkpoint = torch.load(src, map_location="cpu", weights_only=True)
    hparams = dict(checkpoint["hyper_parameters"], n_layer=3)
    torch.manual_seed(0)
    task = LanguageModelingTask(**{k: v for k, v in hparams.items() if not k.startswith("_")})
    folder = tmp_path / "ckpts"
    shutil.copy(_ckpt(lightning_run, 2), folder.mkdir() or folder)
    rewrite_checkpoint(src, folder / "epoch=0-step=6.ckpt", hyper_parameters=hparams, state_dict=task.state_dict())
    results = inspect_json(capsys, folder, "--batches", "1")
    assert [r["step"] for r in results] == [2, 6]
    assert "entropy/attn_norm/L2/H0" not in results[0]["metrics"] and "entropy/attn_norm/L2/H0" in results[1]["metrics"]
    row = next(line for line in inspect(capsys, folder, "--batches", "1").splitlines()
               if line.startswith("entropy/attn_norm/L2/mean"))
    assert row.split()[1] == "—" and math.isfinite(float(row.split()[2]))


def test_a_checkpoint_that_cannot_run_the_batches_is_named(lightning_run, tmp_path, capsys):
    from entrotrain.tasks import LanguageModelingTask

    src = _ckpt(lightning_run, 4)
    checkpoint = torch.load(src, map_location="cpu", weights_only=True)
    hparams = dict(checkpoint["hyper_parameters"], block_size=8)  # the first checkpoint's data has 16 positions
    task = LanguageModelingTask(**{k: v for k, v in hparams.items() if not k.startswith("_")})
    folder = tmp_path / "ckpts"
    shutil.copy(_ckpt(lightning_run, 2), folder.mkdir() or folder)
    rewrite_checkpoint(src, folder / "epoch=0-step=6.ckpt", hyper_parameters=hparams, state_dict=task.state_dict())
    err = inspect_error(capsys, folder, "--batches", "1")
    assert "epoch=0-step=6.ckpt" in err and "block_size" in err


def test_datamodule_without_validation_batches(lightning_run, tmp_path, capsys):
    ckpt = _with_class(_ckpt(lightning_run, 2), tmp_path / "step=2.ckpt", "datamodule_hyper_parameters",
                       "TrainOnlyData")
    assert "--split train" in inspect_error(capsys, ckpt, "--batches", "1", "--import", OUTSIDE)
    results = inspect_json(capsys, ckpt, "--batches", "1", "--import", OUTSIDE, "--split", "train")
    assert math.isfinite(results[0]["metrics"]["entropy/attn_norm/min"])


def test_representation_glob_matching_nothing(lightning_run, capsys):
    err = inspect_error(capsys, lightning_run, "--batches", "1", "--representation", "no.such.*")
    assert "no.such.*" in err


def test_representation_keys(lightning_run, capsys):
    results = inspect_json(capsys, lightning_run, "--batches", "1", "--representation", "model.blocks.*")
    assert math.isfinite(results[0]["metrics"]["entropy/repr/model.blocks.1/rankme"])


def test_text_is_for_hf(lightning_run, tmp_path, capsys):
    assert "--text" in inspect_error(capsys, lightning_run, "--text", _touch(tmp_path / "t.txt", "abc"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CUDA-less message")
@pytest.mark.parametrize("device", ["cuda", "gpu"])
def test_unusable_device(lightning_run, capsys, device):
    assert "--device" in inspect_error(capsys, lightning_run, "--batches", "1", "--device", device)


# ---------------------------------------------------------------------------------------------------- Hugging Face
SEQ = 16
_RAW = "".join(f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(14))
TEXT = _RAW[: SEQ + 3 * ((len(_RAW) - SEQ) // 3)]  # 4 windows: starts (n - SEQ) / 3 apart, exactly


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory, one_thread):
    """``out/checkpoint-3`` and ``out/checkpoint-10`` (random GPT-2, perturbed between them), the tokenizer saved in
    ``out`` as ``Trainer`` saves it, a held-out text file."""
    root = tmp_path_factory.mktemp("hf")
    out = root / "out"
    tokenizer = char_tokenizer(TEXT)
    tokenizer.save_pretrained(out)
    model = tiny_gpt2(len(tokenizer))
    model.save_pretrained(out / "checkpoint-10")
    perturb(model, 0.3, seed=1)
    model.save_pretrained(out / "checkpoint-3")
    text = root / "held_out.txt"
    text.write_text(TEXT)
    return out, text, tokenizer


def _windows(tokenizer, labels: bool) -> list[dict[str, torch.Tensor]]:
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(TEXT)
    gap = (len(ids) - SEQ) // 3
    rows = torch.tensor([ids[i * gap: i * gap + SEQ] for i in range(4)])
    assert rows[-1].tolist() == ids[-SEQ:]  # first window at the start, last at the end
    batches = []
    for chunk in rows.split(2):
        batch = {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
        if labels:
            batch["labels"] = chunk
        batches.append(batch)
    return batches


HF_ARGS = ("--seq-len", str(SEQ), "--batch-size", "2", "--batches", "2")


def _same_as_snapshot(result: dict, model: torch.nn.Module, batches: list) -> None:
    expected = entropy_snapshot(model, batches).metrics
    keys = {k for k in expected if k.startswith("entropy/")}
    assert keys == {k for k in result["metrics"] if k.startswith("entropy/")}
    for key in keys:
        assert result["metrics"][key] == pytest.approx(expected[key], abs=1e-6), key


def test_hf_numbers_equal_snapshot_of_the_transformers_model(hf_run, capsys):
    from transformers import GPT2LMHeadModel

    out, text, tokenizer = hf_run
    results = inspect_json(capsys, out, "--text", text, *HF_ARGS)
    assert [r["step"] for r in results] == [3, 10]
    batches = _windows(tokenizer, labels=True)
    for result in results:
        model = GPT2LMHeadModel.from_pretrained(result["path"]).eval()
        _same_as_snapshot(result, model, batches)
        with torch.no_grad():
            losses = [float(model(**batch).loss) for batch in batches]
        assert result["metrics"]["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
        assert result["sites"]["L1"] == "transformer.h.1.attn"
    assert results[0]["metrics"]["loss"] != results[1]["metrics"]["loss"]


def test_hf_needs_text(hf_run, capsys):
    assert "--text FILE" in inspect_error(capsys, hf_run[0])


def test_hf_missing_text_file(hf_run, tmp_path, capsys):
    assert "no_such.txt" in inspect_error(capsys, hf_run[0], "--text", tmp_path / "no_such.txt")


def test_hf_text_shorter_than_a_window(hf_run, tmp_path, capsys):
    short = _touch(tmp_path / "short.txt", TEXT[:5])
    assert "fewer than --seq-len" in inspect_error(capsys, hf_run[0], "--text", short, *HF_ARGS)


def test_hf_seq_len_capped_at_the_positions(hf_run, capsys):
    out, text, _ = hf_run
    first = inspect(capsys, out, "--text", text, "--seq-len", "100", "--batches", "1").splitlines()[0]
    assert "× 32 tokens" in first  # n_positions 32


def test_hf_tokenizer_elsewhere(hf_run, tmp_path, capsys):
    out, text, _ = hf_run
    models = tmp_path / "models"
    shutil.copytree(out / "checkpoint-3", models / "checkpoint-3")
    err = inspect_error(capsys, models, "--text", text, *HF_ARGS)
    assert "--tokenizer" in err  # no tokenizer in the checkpoint or its parent
    results = inspect_json(capsys, models, "--text", text, *HF_ARGS, "--tokenizer", out)
    reference = inspect_json(capsys, out / "checkpoint-3", "--text", text, *HF_ARGS)
    assert results[0]["metrics"] == reference[0]["metrics"] and "loss" in results[0]["metrics"]


def test_hf_tokenizer_larger_than_the_model_vocabulary(hf_run, tmp_path, capsys):
    out, text, tokenizer = hf_run
    tiny_gpt2(len(tokenizer) // 2).save_pretrained(tmp_path / "checkpoint-1")
    err = inspect_error(capsys, tmp_path / "checkpoint-1", "--text", text, *HF_ARGS, "--tokenizer", out)
    assert "vocab" in err


def test_hf_gqa_model(hf_run, tmp_path, capsys):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out, text, tokenizer = hf_run
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "checkpoint-7")
    result = inspect_json(capsys, tmp_path / "checkpoint-7", "--text", text, *HF_ARGS, "--tokenizer", out)[0]
    assert {f"entropy/attn_norm/L1/H{h}" for h in range(4)} <= set(result["metrics"])
    model = Qwen2ForCausalLM.from_pretrained(tmp_path / "checkpoint-7").eval()
    _same_as_snapshot(result, model, _windows(tokenizer, labels=True))
    assert math.isfinite(result["metrics"]["loss"])


def test_hf_encoder(hf_run, tmp_path, capsys):
    from transformers import BertConfig, BertModel

    out, text, tokenizer = hf_run
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=64)
    BertModel(config).save_pretrained(tmp_path / "checkpoint-7")
    result = inspect_json(capsys, tmp_path / "checkpoint-7", "--text", text, *HF_ARGS, "--tokenizer", out)[0]
    assert "loss" not in result["metrics"]  # an encoder: no labels, no loss
    model = BertModel.from_pretrained(tmp_path / "checkpoint-7").eval()
    _same_as_snapshot(result, model, _windows(tokenizer, labels=False))


# ---------------------------------------------------------------------------------------------------- the text
def _results(
    *metrics: dict[str, float], sites: dict[str, str] | None = None
) -> list[tuple[Checkpoint, EntropySnapshot]]:
    return [(Checkpoint(Path(f"s{i}.ckpt"), "lightning", 10 * (i + 1)), EntropySnapshot(dict(m), dict(sites or {})))
            for i, m in enumerate(metrics)]


def _heads(*values: float, share: float | None = None) -> dict[str, float]:
    """Per-head normalised entropies ``L0/H0, L0/H1, L1/H0, ...`` (two heads a layer) and their collapse share."""
    metrics = {f"entropy/attn_norm/L{i // 2}/H{i % 2}": v for i, v in enumerate(values)}
    if share is not None:
        metrics["entropy/attn/collapse_frac"] = share
    return metrics


def test_one_checkpoint_has_no_fall_and_no_onset():
    results = _results(_heads(0.9, 0.01, share=0.5))
    assert fallen_heads(results) == [] and collapse_onset(results, 0.1) == []


def test_fallen_heads_largest_falls_first_nan_and_small_falls_left_out():
    results = _results(
        _heads(0.9, 0.8, math.nan, 0.5, 0.7),
        _heads(0.5, 0.5, 0.5, 0.5, 0.5),
        _heads(0.1, 0.78, 0.0, math.nan, 0.2),
        sites={"L0": "model.blocks.0.attn", "L2": "model.blocks.2.attn"},
    )
    lines = fallen_heads(results)
    assert lines[0] == "Heads whose attention fell most (normalised entropy, step 10 → step 30):"
    assert [line.split()[:2] for line in lines[1:]] == [["L0/H0", "model.blocks.0.attn"],
                                                        ["L2/H0", "model.blocks.2.attn"]]
    assert lines[1].endswith("0.900 → 0.100") and lines[2].endswith("0.700 → 0.200")


def test_fallen_heads_top_and_no_fall():
    before, after = _heads(*[0.9] * 7), _heads(*[0.1 + 0.01 * i for i in range(7)])
    lines = fallen_heads(_results(before, after), top=5)
    assert len(lines) == 1 + 5 + 1 and lines[-1].strip().startswith("… and 2 more heads")
    assert fallen_heads(_results(after, before)) == []  # entropy rose


def test_collapse_onset_names_the_first_rise():
    results = _results(_heads(0.9, 0.9, 0.9, 0.9, share=0.0), _heads(0.9, 0.9, 0.9, 0.9, share=0.0),
                       _heads(0.05, 0.05, 0.9, 0.9, share=0.5), _heads(0.0, 0.0, 0.0, 0.0, share=1.0))
    assert collapse_onset(results, 0.1) == [
        "Collapse first shows at step 30: 2 of 4 heads below 0.1 (0 at step 10, 0 at step 20)."
    ]
    assert collapse_onset(results[:2], 0.1) == []  # no rise
    assert collapse_onset(results[2:][::-1], 0.1) == []  # a fall is no onset


def test_collapse_onset_with_nan_shares():
    steady = _heads(0.9, 0.9, 0.9, 0.9, share=0.0)
    collapsed = _heads(0.05, 0.9, 0.9, 0.9, share=0.25)
    unknown = _heads(math.nan, 0.9, 0.9, 0.9, share=math.nan)
    assert collapse_onset(_results(unknown, collapsed), 0.1) == []  # no baseline
    lines = collapse_onset(_results(steady, unknown, collapsed), 0.1)
    assert len(lines) == 1 and lines[0].startswith("Collapse first shows at step 30: 1 of 4 heads below 0.1")


def test_table_thins_columns_keeps_first_and_last():
    results = _results(*[{"loss": float(i)} for i in range(7)])
    lines = snapshot_table(results, ["loss"], columns=3)
    assert lines[0].split() == ["checkpoint", "step", "10", "step", "40", "step", "70", "trend"]
    assert lines[1].split()[:4] == ["loss", "0", "3", "6"] and len(lines[1].split()[-1]) == 7  # trend: all seven
    assert lines[-1] == "(3 of 7 checkpoints shown, evenly spread; the trend has them all)"
    assert len(snapshot_table(results, ["loss"], columns=7)[0].split()) == 1 + 2 * 7 + 1


def test_table_key_globs_in_natural_order_nan_as_dash_and_row_limit():
    one = {f"entropy/attn_norm/L{layer}/H{h}": 0.5 for layer in (10, 2) for h in (0, 1)}
    two = dict(one, **{"entropy/attn_norm/L2/H0": math.nan})
    lines = snapshot_table(_results(one, two), ["entropy/attn_norm/L*/H0"])
    assert [line.split()[0] for line in lines[1:]] == ["entropy/attn_norm/L2/H0", "entropy/attn_norm/L10/H0"]
    assert lines[1].split()[1:3] == ["0.5", "—"]
    limited = snapshot_table(_results(one, two), ["entropy/*"], rows=2)
    assert limited[-1].startswith("… 2 more keys")
    assert snapshot_table(_results(one), ["nothing/*"]) == ["(no key matches nothing/*)"]


def test_nonfinite_rows_only_when_not_zero():
    quiet = {"entropy/attn/nonfinite": 0.0, "entropy/repr/x/nonfinite": 0.0, "loss": 1.0}
    noisy = dict(quiet, **{"entropy/repr/x/nonfinite": 3.0})
    assert [line.split()[0] for line in snapshot_table(_results(quiet, quiet))[1:]] == ["loss"]
    assert [line.split()[0] for line in snapshot_table(_results(quiet, noisy))[1:]] == [
        "loss", "entropy/repr/x/nonfinite"
    ]


@pytest.mark.parametrize("case", ["no_weights", "unknown_type"])
def test_hf_folder_that_cannot_be_loaded(hf_run, tmp_path, capsys, case):
    out, text, _ = hf_run
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    if case == "no_weights":  # config.json, but the weights were never written (a torn or sharded save)
        shutil.copy(out / "checkpoint-3" / "config.json", folder / "config.json")
    else:
        (folder / "config.json").write_text(json.dumps({"model_type": "no_such_model_type"}))
    assert str(folder) in inspect_error(capsys, folder, "--text", text, *HF_ARGS, "--tokenizer", out)


def test_hf_encoder_decoder_is_refused_by_name(hf_run, tmp_path, capsys):
    from transformers import T5Config, T5ForConditionalGeneration

    out, text, tokenizer = hf_run
    config = T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                      decoder_start_token_id=0)
    T5ForConditionalGeneration(config).save_pretrained(tmp_path / "checkpoint-1")
    err = inspect_error(capsys, tmp_path / "checkpoint-1", "--text", text, *HF_ARGS, "--tokenizer", out)
    assert "encoder-decoder" in err and "entropy_snapshot" in err


def test_last_ckpt_takes_the_step_it_stores(lightning_run, tmp_path, capsys):
    """ModelCheckpoint(save_last=True) writes last.ckpt beside the step checkpoints: a copy of the latest one is not
    inspected twice (and does not turn the record's steps into ranks); one of a later step takes its place."""
    from entrotrain.dashboards.run_reader import load_run

    folder = tmp_path / "ckpts"
    folder.mkdir()
    for step in (2, 4):
        shutil.copy(_ckpt(lightning_run, step), folder)
    shutil.copy(_ckpt(lightning_run, 4), folder / "last.ckpt")
    assert [(c.path.name, c.step) for c in find_checkpoints([folder])] == [
        ("epoch=0-step=2.ckpt", 2), ("epoch=0-step=4.ckpt", 4)
    ]
    assert [(c.path.name, c.step) for c in find_checkpoints([folder / "last.ckpt"])] == [("last.ckpt", 4)]
    checkpoint = torch.load(_ckpt(lightning_run, 4), map_location="cpu", weights_only=True)
    rewrite_checkpoint(_ckpt(lightning_run, 4), folder / "last.ckpt", global_step=checkpoint["global_step"] + 2)
    assert [(c.path.name, c.step) for c in find_checkpoints([folder])] == [
        ("epoch=0-step=2.ckpt", 2), ("epoch=0-step=4.ckpt", 4), ("last.ckpt", 6)
    ]
    out = inspect(capsys, folder, "--batches", "1", "--keys", "loss", "--record", tmp_path / "rec")
    assert load_run(Path(out.split("run record ")[1].split()[0])).scalars["loss"][0].tolist() == [2, 4, 6]


def test_attention_free_model_with_other_monitors(lightning_run, tmp_path, capsys):
    ckpt = _with_class(_ckpt(lightning_run, 2), tmp_path / "step=2.ckpt", "hyper_parameters", "NoAttentionTask")
    # the attention monitor alone: nothing to show, an error that says so
    assert "captured no attention" in inspect_error(capsys, ckpt, "--batches", "1", "--import", OUTSIDE)
    # with the representation monitor asked for, its numbers (no attention keys)
    with pytest.warns(UserWarning, match="captured no attention"):
        results = inspect_json(capsys, ckpt, "--batches", "1", "--import", OUTSIDE,
                               "--representation", "model.blocks.*")
    metrics = results[0]["metrics"]
    assert math.isfinite(metrics["entropy/repr/model.blocks.1/rankme"])
    assert not any(key.startswith("entropy/attn") for key in metrics)


# -------------------------------------------------------------------------------------------- found in snapshot.py
class _OneLogit(torch.nn.Module):
    """Attention, then one logit per row: on a batch of one row the output has one element and is no loss."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(4, 1, batch_first=True)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.attn(x, x, x)
        return self.head(y.mean(1))  # (B, 1)


def test_snapshot_loss_is_a_returned_scalar_not_a_one_element_output():
    torch.manual_seed(0)
    shot = entropy_snapshot(_OneLogit(), [torch.randn(1, 3, 4), torch.randn(1, 3, 4)])
    assert "entropy/attn_norm/min" in shot.metrics  # the model ran and was tapped
    assert "loss" not in shot.metrics


def test_datamodule_set_up_as_fit_sets_it_up(lightning_run, lightning_json, tmp_path, capsys):
    ckpt = _with_class(_ckpt(lightning_run, 2), tmp_path / "step=2.ckpt", "datamodule_hyper_parameters",
                       "FitStageOnlyData")
    results = inspect_json(capsys, ckpt, "--batches", "2", "--import", OUTSIDE)
    assert results[0]["metrics"]["loss"] == pytest.approx(lightning_json[0]["metrics"]["loss"], rel=1e-6)


def test_validation_step_calling_self(lightning_run, tmp_path, capsys):
    """A validation_step that calls ``self(x)`` runs the module's forward inside (not itself again), and the root
    module's hooks (the prediction monitor's) see one forward per batch."""
    src = _ckpt(lightning_run, 2)
    ckpt = _with_class(src, tmp_path / "step=2.ckpt", "hyper_parameters", "SelfCallingTask")
    expected = inspect_json(capsys, src, "--batches", "2", "--prediction")[0]["metrics"]
    metrics = inspect_json(capsys, ckpt, "--batches", "2", "--import", OUTSIDE, "--prediction")[0]["metrics"]
    assert "entropy/pred/train/mean" in expected
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_validation_epoch_start_runs_before_the_steps(lightning_run, lightning_json, tmp_path, capsys):
    ckpt = _with_class(_ckpt(lightning_run, 2), tmp_path / "step=2.ckpt", "hyper_parameters", "EpochStateTask")
    results = inspect_json(capsys, ckpt, "--batches", "2", "--import", OUTSIDE)
    assert results[0]["metrics"]["loss"] == pytest.approx(lightning_json[0]["metrics"]["loss"], rel=1e-6)


def test_checkpoint_without_datamodule_class_says_why(lightning_run, tmp_path, capsys):
    checkpoint = torch.load(_ckpt(lightning_run, 2), map_location="cpu", weights_only=True)
    del checkpoint["datamodule_hyper_parameters"], checkpoint["datamodule_hparams_name"]
    torch.save(checkpoint, tmp_path / "step=2.ckpt")
    # data passed to fit() directly, or (LightningCLI) a datamodule that does not save its hyperparameters
    assert "save_hyperparameters" in inspect_error(capsys, tmp_path / "step=2.ckpt", "--batches", "1")


def test_checkpoints_of_several_runs_are_not_interleaved(tmp_path, capsys):
    for run in ("run_a", "run_b"):
        for step in (50, 100):
            _touch(tmp_path / f"runs/{run}/checkpoints/epoch=0-step={step}.ckpt")
    with pytest.raises(EntrotrainError, match="several runs") as err:
        find_checkpoints([tmp_path / "runs"])
    assert "run_a" in str(err.value) and "run_b" in str(err.value)
    assert "several runs" in inspect_error(capsys, tmp_path / "runs")
    assert [c.step for c in find_checkpoints([tmp_path / "runs/run_a"])] == [50, 100]
    _touch(tmp_path / "runs/run_a/checkpoints/epoch=0-step=100-v1.ckpt")  # re-saved in one run's folder: fine
    assert [c.step for c in find_checkpoints([tmp_path / "runs/run_a"])] == [50, 100, 100]


def test_flags_before_the_checkpoints_take_one_value_each(lightning_run, capsys):
    """`--representation GLOB` / `--keys GLOB` (repeatable) and `--prediction` never swallow a checkpoint path."""
    results = inspect_json(capsys, "--representation", "model.blocks.*", "--keys", "loss", "--prediction",
                           lightning_run, "--batches", "1")
    assert [r["step"] for r in results] == [2, 4]
    metrics = results[0]["metrics"]
    assert "entropy/repr/model.blocks.0/rankme" in metrics and "entropy/pred/train/mean" in metrics
    out = inspect(capsys, "--keys", "loss", "--keys", "entropy/attn_norm/min", lightning_run, "--batches", "1")
    rows = [line.split()[0] for line in out.splitlines() if line.startswith(("loss", "entropy/"))]
    assert rows == ["loss", "entropy/attn_norm/min"]


def test_router_monitor_on_a_moe_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpts = tmp_path / "ckpts"
    main([
        "fit", "--recipe", "moe_router_collapse", "--trainer.max_steps", "2", "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "true", "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps", "2", "--trainer.callbacks.dirpath", str(ckpts),
        "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false",
    ])
    (result,) = inspect_json(capsys, "--router", "**.router", "--router-top-k", "1", ckpts, "--batches", "1")
    assert result["step"] == 2
    assert any(key.startswith("entropy/router/") for key in result["metrics"]), sorted(result["metrics"])
    err = inspect_error(capsys, ckpts, "--batches", "1")  # attention alone: this model has none to tap
    assert "captured no attention" in err
