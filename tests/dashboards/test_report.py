"""entrotrain report: sections, figures, key numbers, overlay, and clear errors on bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from entrotrain.cli import main  # noqa: E402
from entrotrain.dashboards.report import build_report, sections_of  # noqa: E402
from entrotrain.dashboards.run_reader import load_run  # noqa: E402
from entrotrain.errors import EntrotrainError  # noqa: E402
from tests.helpers.report_page import parse_page  # noqa: E402


_parse = parse_page


def test_single_attention_run(attention_run):
    index = build_report([attention_run])
    assert index == attention_run / "report" / "index.html"
    page = _parse(index)
    text = " ".join(page.text)
    # every figure referenced exists beside the page, by relative path, and is a PNG
    assert {"attention_summary.png", "attention_heads_over_time.png", "attention_layer_head.png"} <= set(page.images)
    for src in page.images:
        assert not src.startswith(("/", "http")) and (index.parent / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # key numbers: first -> last of the headline metrics, as logged
    card = page.cards[("entropy/attn_norm/min", "collapse")]
    assert float(card["first"]) == pytest.approx(0.8) and float(card["last"]) == pytest.approx(0.02)
    assert "0.8 → 0.02" in card["text"]
    assert page.cards[("entropy/attn/collapse_frac", "collapse")]["text"] == "0 % → 33 %"
    # the failure is stated in words, with the heads and the guard's alert
    assert "2 of 6 attention heads are collapsed" in text and "L0H1, L1H2" in text
    assert "EntropyCollapseGuard fired 1 time(s); first at step 60" in text
    # sections by prefix, the config collapsible, no scripts or remote resources
    html = index.read_text()
    assert 'id="attention"' in html and 'id="task"' in html and "<details><summary>collapse: config.yaml" in html
    assert "<script" not in html and "http://" not in html and "https://" not in html


def test_overlay_of_failure_and_cure(attention_run, cure_run, tmp_path):
    index = build_report([attention_run, cure_run], tmp_path / "cmp")
    page = _parse(index)
    text = " ".join(page.text)
    assert "entrotrain report — collapse vs cure" in text
    assert "At the end, entropy/attn_norm/min is 0.02 in collapse and 0.7 in cure." in text
    assert "2 of 6 attention heads are collapsed" in text
    assert "No attention head is below the collapse threshold 0.1" in text
    assert page.cards[("entropy/attn_norm/min", "cure")]["last"] != page.cards[("entropy/attn_norm/min", "collapse")]["last"]
    assert all((index.parent / src).is_file() for src in page.images)
    assert "section_sigma_reparam_per_head.png" in page.images  # per-head keys of any monitor get a map


def test_policy_and_representation_sections(policy_run, repr_run, tmp_path):
    page = _parse(build_report([policy_run], tmp_path / "p"))
    text = " ".join(page.text)
    assert "policy_entropy_reward.png" in page.images
    assert "Fitted R = −0.2·exp(H) + 1" in text and "b − a = 0.8" in text
    assert 'Policy entropy went from 1.25 to' in text
    assert any(src.startswith("section_grpo") for src in page.images)  # a section nobody declared: from its prefix

    page = _parse(build_report([repr_run], tmp_path / "r"))
    text = " ".join(page.text)
    assert {"spectra.png", "histograms.png"} <= set(page.images)
    assert "Representation: entropy/repr/" in text
    assert ("entropy/repr/encoder/rankme", "ssl_toy") in page.cards


def test_sections_follow_prefixes():
    keys = ["entropy/attn/min", "entropy/attn_norm/L0/H1", "entropy/policy/mean", "entropy/repr/l/rankme",
            "sigma_reparam/qk_norm/max", "val/loss", "train/loss", "grpo/reward", "lr-Adam", "entropy/new/x"]
    sections = sections_of(keys)
    assert [s.id for s in sections] == ["attention", "policy", "repr", "sigma_reparam", "entropy/new", "task", "grpo", "lr"]
    assert sections[0].keys == ["entropy/attn/min", "entropy/attn_norm/L0/H1"]


def test_in_progress_run_is_reported_with_a_warning(make_attention_run, tmp_path, capsys):
    run_dir = make_attention_run(tmp_path, "live", finish=False)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 120, "values": {"entropy/at')  # a line being written right now
    run = load_run(run_dir)
    assert run.status == "running" and "still in progress" in run.warnings[0]
    html = build_report([run_dir]).read_text()
    assert "still in progress" in html and "up to step 100" in html

    main(["report", str(run_dir)])
    assert "warning: The run is still in progress" in capsys.readouterr().err

    meta = json.loads((run_dir / "meta.json").read_text())
    meta["pid"] = 2**22 + 12345  # no such process: the run was killed
    (run_dir / "meta.json").write_text(json.dumps(meta))
    killed = load_run(run_dir)  # one wording everywhere (it said "never finished" here and "running" in the table)
    assert killed.status == "killed" and "stopped without finishing" in killed.warnings[0]
    html = build_report([run_dir]).read_text()
    assert "still in progress" not in html and ">killed (no update since " in html


def test_errors_name_the_problem(make_attention_run, tmp_path):
    with pytest.raises(EntrotrainError, match="does not exist"):
        build_report([tmp_path / "nope"])
    make_attention_run(tmp_path / "runs", "r1")
    with pytest.raises(EntrotrainError, match=r"not an entrotrain run record: expected a folder holding meta\.json.*found below it: .*r1"):
        build_report([tmp_path / "runs"])
    wandb_dir = tmp_path / "offline-run-20260101_000000-abc"
    (wandb_dir / "files").mkdir(parents=True)
    with pytest.raises(EntrotrainError, match="looks like a wandb run folder"):
        build_report([wandb_dir])
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "meta.json").write_text('{"format": "something-else"}')
    with pytest.raises(EntrotrainError, match="expected 'entrotrain-run-record/1'"):
        build_report([bare])
    with pytest.raises(EntrotrainError, match="one run record folder, or two"):
        build_report([])


def test_run_without_monitor_output(tmp_path):
    from entrotrain.dashboards.run_record import RunRecordLogger

    logger = RunRecordLogger(tmp_path, version="plain")
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.finalize("success")
    with pytest.raises(EntrotrainError, match=r"no monitor output .*\['train/loss'\].*AttentionEntropyMonitor"):
        build_report([logger.run_dir])


def test_command_line(attention_run, cure_run, tmp_path, capsys):
    out = tmp_path / "out"
    index = main(["report", str(attention_run), str(cure_run), "-o", str(out)])
    assert index == out / "index.html" and index.is_file()
    assert f"report written to {index}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path / "missing")])
    assert exc.value.code == 2
    assert "entrotrain report: error:" in capsys.readouterr().err


def test_rerun_replaces_stale_figures(attention_run):
    index = build_report([attention_run])
    stale = index.parent / "old_figure.png"
    stale.write_bytes(b"x")
    build_report([attention_run])
    assert not stale.exists()


def test_recipes_listed_one_line_each(capsys):
    main(["recipes"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    recipes = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
    listed = [ln.split()[0] for ln in lines if ln.split()[0] in recipes]
    assert listed == recipes  # every recipe, by the name `entrotrain fit --recipe NAME` takes, once, in order
    for line in lines:
        if line.split()[0] in recipes:
            assert len(line.split(maxsplit=1)) == 2 and len(line) < 160, line
    assert re.search(r"^attention_collapse +Attention-entropy collapse", "\n".join(lines), re.M)
