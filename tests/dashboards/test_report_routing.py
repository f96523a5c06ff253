"""entrotrain report: the MoE routing section (RouterEntropyMonitor's keys) and the expert-load wandb images.

Run records are synthetic, written through RunRecordLogger the way a RouterEntropyMonitor run writes them: the
collapsing run's layer L0 moves from uniform load to 92 % / 8 % on two of eight experts, L1 to 60 / 35 / 5 %; the
cure stays near uniform. Every expected number below is recomputed from the loads the writer logged.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from entrotrain.dashboards import report_figures_routing as router_figs  # noqa: E402
from entrotrain.dashboards.report import build_report, sections_of  # noqa: E402
from entrotrain.dashboards.run_reader import RunData, load_run  # noqa: E402
from entrotrain.dashboards.run_record import RunRecordLogger  # noqa: E402
from tests.helpers.report_page import parse_page as _parse  # noqa: E402

EXPERTS = 8
STEPS = list(range(0, 201, 20))
DEAD_BELOW = 1e-3
_FINAL = {
    (True, 0): [0.92, 0.08] + [0.0] * 6,
    (True, 1): [0.60, 0.35] + [0.05 / 6] * 6,
    (False, 0): [0.125 + 0.01 * ((-1) ** e) for e in range(EXPERTS)],
    (False, 1): [0.125 + 0.02 * ((-1) ** (e // 2)) for e in range(EXPERTS)],
}


def loads(step: int, layer: int, collapse: bool) -> np.ndarray:
    """Load shares at ``step``: linear from uniform (step 0) to the final shares (step 200)."""
    a = step / STEPS[-1]
    return (1 - a) * np.full(EXPERTS, 1 / EXPERTS) + a * np.array(_FINAL[(collapse, layer)])


def _norm_entropy(p: np.ndarray) -> float:
    q = p[p > 0]
    return float(-(q * np.log(q)).sum() / math.log(len(p)))


def _fewest_carrying(p: np.ndarray, share: float) -> tuple[float, int]:
    """(their share, how many): the fewest experts whose loads add up to at least ``share`` of the total."""
    total, m = 0.0, 0
    for value in sorted(p, reverse=True):
        total, m = total + value, m + 1
        if total >= share * p.sum() - 1e-12:
            return total / p.sum(), m
    return 1.0, len(p)


def write_router_run(root: Path, name: str, collapse: bool, extra: dict[int, dict[str, float]] | None = None) -> Path:
    logger = RunRecordLogger(root, name="records", version=name, run_name=name)
    logger.log_hyperparams({"entropy/router/layers": ["moe.0.router", "moe.1.router"]})
    for step in STEPS:
        metrics: dict[str, float] = {}
        grid = np.stack([loads(step, layer, collapse) for layer in range(2)])
        for layer in range(2):
            p = grid[layer]
            base = f"entropy/router/L{layer}"
            metrics.update({f"{base}/load/E{e}": float(p[e]) for e in range(EXPERTS)})
            metrics[f"{base}/load_entropy_norm"] = _norm_entropy(p)
            metrics[f"{base}/load_entropy"] = _norm_entropy(p) * math.log(EXPERTS)
            metrics[f"{base}/entropy_norm"] = 0.9 - (0.6 * step / 200 if collapse else 0.05 * step / 200)
            metrics[f"{base}/dead_frac"] = float((p < DEAD_BELOW).mean())
            metrics[f"{base}/tsallis"] = 1.5 - step / 400
            metrics[f"{base}/top1_margin"] = 0.1 + step / 1000
        metrics["entropy/router/load_entropy_norm_min"] = min(metrics[f"entropy/router/L{l}/load_entropy_norm"] for l in range(2))
        metrics["entropy/router/dead_frac_max"] = max(metrics[f"entropy/router/L{l}/dead_frac"] for l in range(2))
        metrics["entropy/router/entropy_norm_mean"] = metrics["entropy/router/L0/entropy_norm"]
        metrics["entropy/router/nonfinite"] = 0.0
        metrics.update((extra or {}).get(step, {}))
        logger.log_metrics(metrics, step=step)
        logger.log_media("entropy/router/load_heatmap", grid, step, kind="heatmap", meta={"vmin": 0, "vmax": 1})
        logger.log_metrics({"train/loss": 2.0 - step / 400, "val/acc": 0.5 + step / 1000}, step=step)
    logger.finalize("success")
    return logger.run_dir


@pytest.fixture
def collapse_run(tmp_path: Path) -> Path:
    return write_router_run(tmp_path, "collapse", collapse=True)


@pytest.fixture
def balanced_run(tmp_path: Path) -> Path:
    return write_router_run(tmp_path, "cure", collapse=False)


def test_router_section_figures_cards_and_finding(collapse_run):
    index = build_report([collapse_run])
    page = _parse(index)
    text = " ".join(page.text)
    assert {"router_load_over_time.png", "router_curves.png", "section_router.png"} <= set(page.images)
    for src in page.images:
        assert (index.parent / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the stored layer × expert media is drawn from the per-expert scalars, not again under "Other media"
    assert "heatmaps.png" not in page.images
    html = index.read_text()
    assert 'id="router"' in html and ">MoE routing<" in html
    # headline cards: first -> last, the dead share in percent
    end = [loads(200, layer, True) for layer in range(2)]
    card = page.cards[("entropy/router/load_entropy_norm_min", "collapse")]
    assert float(card["first"]) == pytest.approx(1.0) and float(card["last"]) == pytest.approx(min(map(_norm_entropy, end)))
    dead = max(float((p < DEAD_BELOW).mean()) for p in end)
    assert page.cards[("entropy/router/dead_frac_max", "collapse")]["text"] == f"0 % → {100 * dead:.0f} %"
    # the finding, in words: 92 % of L0's load on 1 of 8 experts; L1 needs 2 experts (60 + 35 = 95 %) for 90 %
    assert "MoE routing: layer L0 routes 92 % of tokens to 1 of 8 experts at the end (step 200); 6 of 8 experts dead (75 %)." in text
    assert "layer L1 routes 95 % of tokens to 2 of 8 experts at the end (step 200)." in text


def test_two_runs_side_by_side_and_compared(collapse_run, balanced_run, tmp_path):
    index = build_report([collapse_run, balanced_run], tmp_path / "cmp")
    page = _parse(index)
    text = " ".join(page.text)
    assert "At the end, entropy/router/dead_frac_max is 75 % in collapse and 0 % in cure." in text
    top = max(loads(200, 0, False))
    _, m = _fewest_carrying(loads(200, 0, False), 0.9)
    assert f"layer L0 needs {m} of 8 experts for 90 % of its tokens at the end (step 200): largest share {100 * top:.0f} %, uniform 12 %" in text
    assert {"router_load_over_time.png", "router_curves.png"} <= set(page.images)
    assert "(collapse left, cure right)" in text and "one colour scale, 0 to 0.92" in text  # the figure's caption


def test_load_matrices_hold_what_was_logged(collapse_run):
    run = load_run(collapse_run)
    mats = router_figs.load_matrices(run)
    assert sorted(mats) == [0, 1]
    steps, grid = mats[1]
    assert steps.tolist() == STEPS and grid.shape == (EXPERTS, len(STEPS))
    for j, step in enumerate(STEPS):
        np.testing.assert_allclose(grid[:, j], loads(step, 1, True), rtol=0, atol=1e-12)


def _with_nonfinite(run: RunData) -> RunData:
    """The run with NaN / ±inf written into its load, curve and summary series at a few steps."""
    scalars = {k: (s.copy(), v.copy()) for k, (s, v) in run.scalars.items()}
    scalars["entropy/router/L0/load/E0"][1][[3, -1]] = [np.nan, np.inf]
    scalars["entropy/router/L0/load/E3"][1][5] = -np.inf
    scalars["entropy/router/L1/entropy_norm"][1][4] = np.nan
    scalars["entropy/router/L0/dead_frac"][1][-1] = np.nan
    for e in range(EXPERTS):  # the last step of L1 entirely non-finite: the finding falls back to the step before
        scalars[f"entropy/router/L1/load/E{e}"][1][-1] = np.nan
    return RunData(path=run.path, meta=dict(run.meta), scalars=scalars, hparams=run.hparams, media=run.media)


def test_nonfinite_values_never_break_the_section(collapse_run, tmp_path):
    run = _with_nonfinite(load_run(collapse_run))
    figure = router_figs.router_load_over_time([run], tmp_path)
    assert (tmp_path / figure.file).is_file()
    assert "0 to 0.92" not in figure.caption and "inf" not in figure.caption and "nan" not in figure.caption
    assert router_figs.router_curves([run], tmp_path) is not None
    lines = router_figs.router_findings(run)
    # the last complete columns: L0 at step 180 (step 200 holds inf), L1 at step 180 (step 200 all NaN); L0's dead
    # share is NaN at 200 and 0 at 180 (never an older value standing in for a missing one)
    for layer, line in enumerate(lines):
        share, m = _fewest_carrying(loads(180, layer, True), 0.9)
        assert line == f"MoE routing: layer L{layer} routes {100 * share:.0f} % of tokens to {m} of 8 experts at the end (step 180)."
    assert "nan" not in " ".join(lines).lower()


def test_nonfinite_through_the_logger_are_skipped(tmp_path):
    extra = {200: {"entropy/router/L0/load/E0": float("nan"), "entropy/router/dead_frac_max": float("inf")}}
    run_dir = write_router_run(tmp_path, "nan", collapse=True, extra=extra)
    run = load_run(run_dir)
    assert run.scalars["entropy/router/L0/load/E0"][0][-1] == 180  # the NaN was never written as a value
    assert run.scalars["entropy/router/dead_frac_max"][0][-1] == 180
    # step 200 lacks E0: the finding speaks of step 180, the last step with every expert's share
    share, m = _fewest_carrying(loads(180, 0, True), 0.9)
    assert router_figs.router_findings(run)[0].startswith(
        f"MoE routing: layer L0 routes {100 * share:.0f} % of tokens to {m} of 8 experts at the end (step 180)")


def test_partial_keys_and_old_records(tmp_path, attention_run):
    # loads only: a map and findings, no curves
    logger = RunRecordLogger(tmp_path, name="records", version="loads", run_name="loads")
    for step in (0, 10):
        logger.log_metrics({f"entropy/router/L0/load/E{e}": [0.5, 0.5, 0.0, 0.0][e] for e in range(4)}, step=step)
    logger.finalize("success")
    loads_only = logger.run_dir
    page = _parse(build_report([loads_only]))
    assert "router_load_over_time.png" in page.images and "router_curves.png" not in page.images
    assert "layer L0 routes 100 % of tokens to 2 of 4 experts at the end (step 10)" in " ".join(page.text)
    # summaries only: the section, its cards, no load map
    logger = RunRecordLogger(tmp_path, name="records", version="summ", run_name="summ")
    for step in (0, 10):
        logger.log_metrics({"entropy/router/dead_frac_max": step / 20, "entropy/router/load_entropy_norm_min": 1 - step / 20}, step=step)
    logger.finalize("success")
    page = _parse(build_report([logger.run_dir]))
    assert "router_load_over_time.png" not in page.images and page.cards[("entropy/router/dead_frac_max", "summ")]["text"] == "0 % → 50 %"
    # a record from before the router monitor: no router section; beside a router run, its panels say "not logged"
    html = build_report([attention_run]).read_text()
    assert 'id="router"' not in html and "router_" not in html
    figure = router_figs.router_load_over_time([load_run(attention_run), load_run(loads_only)], tmp_path)
    assert figure is not None and (tmp_path / figure.file).is_file()
    assert router_figs.router_load_over_time([load_run(attention_run)], tmp_path) is None
    assert router_figs.router_curves([load_run(attention_run)], tmp_path) is None


def test_many_layers_show_the_least_balanced(tmp_path):
    logger = RunRecordLogger(tmp_path, name="records", version="deep", run_name="deep")
    skew = {layer: 0.25 + 0.05 * layer for layer in range(12)}  # the top share grows with depth; L3 collapses
    skew[3] = 1.0
    for step in (0, 10):
        metrics = {}
        for layer, top in skew.items():
            p = [top] + [(1 - top) / 3] * 3 if step else [0.25] * 4
            metrics.update({f"entropy/router/L{layer}/load/E{e}": p[e] for e in range(4)})
        logger.log_metrics(metrics, step=step)
    logger.finalize("success")
    run = load_run(logger.run_dir)
    shown = router_figs.least_balanced([router_figs.load_matrices(run)])
    assert shown == [3, 5, 6, 7, 8, 9, 10, 11]
    figure = router_figs.router_load_over_time([run], tmp_path)
    assert "the 8 least balanced of 12 MoE layers" in figure.caption
    lines = router_figs.router_findings(run)
    assert [line.split()[3] for line in lines[:8]] == [f"L{layer}" for layer in shown]
    assert lines[0] == "MoE routing: layer L3 routes 100 % of tokens to 1 of 4 experts at the end (step 10)."
    assert lines[-1] == "MoE routing: the other 4 MoE layers are more balanced (see the tables)."


def test_router_section_is_known():
    sections = sections_of(["entropy/router/L0/load/E0", "entropy/attn/min", "entropy/router/dead_frac_max", "train/loss"])
    assert [s.id for s in sections] == ["attention", "router", "task"]
    assert sections[1].title == "MoE routing"


# ---------------------------------------------------------------------- wandb images
def test_expert_load_images():
    pytest.importorskip("PIL")
    from entrotrain.dashboards.wandb_media import expert_load_image, expert_load_over_time_image
    from entrotrain.errors import EntrotrainError

    load = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, float("nan")]])
    image = expert_load_image(load)  # default scale 0 .. 2/E = 0.5
    assert "balanced = 1/4 = 0.25" in image._caption and "colour 0..0.5" in image._caption
    pixels = np.array(image.image)
    cell = pixels.shape[0] // 2
    assert pixels[0, 0].tolist() == [253, 231, 37] and pixels[0, cell].tolist() == [68, 1, 84]  # overloaded bright, 0 dark
    assert pixels[cell, 0].tolist() == [33, 145, 140]  # balanced share: mid-scale
    assert pixels[cell, 3 * cell].tolist() == [128, 128, 128]  # NaN grey
    assert "colour 0..1" in expert_load_image(load, vmax=1.0)._caption
    with pytest.raises(EntrotrainError, match=r"load must be \(layers, experts\), got shape \(4,\)"):
        expert_load_image(torch.ones(4))

    history = [torch.full((2, 4), 0.25), load]
    over_time = expert_load_over_time_image(history, [0, 50], vmax=1.0)
    pixels = np.array(over_time.image)
    cell_h, cell_w = pixels.shape[0] // 8, pixels.shape[1] // 2
    assert pixels[0, cell_w].tolist() == [253, 231, 37]  # L0E0 at step 50: share 1
    assert pixels[cell_h, cell_w].tolist() == [68, 1, 84]  # L0E1 at step 50: 0
    assert pixels[cell_h, 0].tolist() == pixels[0, 0].tolist() == [59, 82, 139]  # step 0: 0.25 everywhere
    assert pixels[7 * cell_h, cell_w].tolist() == [128, 128, 128]
    assert "rows L0E0..L1E3" in over_time._caption and "steps 0..50" in over_time._caption
    assert "colour 0..0.5" in expert_load_over_time_image(history, [0, 50])._caption
    assert expert_load_over_time_image([], []) is None


# ---------------------------------------------------------------------- end to end: the monitor's own record
class _CollapsingRouter(L.LightningModule):
    """One router (4 features → 4 experts) trained to send every token to expert 0; ``reg/bonus`` is a (negative)
    weighted router-entropy bonus logged beside ``train/loss``, as entrotrain's tasks log regulariser parts."""

    def __init__(self) -> None:
        super().__init__()
        self.router = torch.nn.Linear(4, 4)

    def training_step(self, batch, batch_idx):
        logits = self.router(batch[0])
        logp = logits.log_softmax(-1)
        loss = -logp[:, 0].mean()
        bonus = 0.01 * (logp.exp() * logp).sum(-1).mean()  # −0.01·H
        self.log("train/loss", loss)
        self.log("reg/bonus", bonus)
        return {"loss": loss + bonus, "router_logits": (logits,)}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_report_of_a_router_monitor_run(tmp_path):
    from entrotrain.callbacks.router_monitor import RouterEntropyMonitor
    from tests.helpers.lightning_models import quiet_trainer

    L.seed_everything(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4))
    record = RunRecordLogger(tmp_path, version="moe")
    trainer = quiet_trainer(max_steps=40, logger=record, log_every_n_steps=1,
                            callbacks=[RouterEntropyMonitor(every_n_steps=5, top_k=1, print_summary=False)])
    trainer.fit(_CollapsingRouter(), torch.utils.data.DataLoader(data, batch_size=16))
    run = load_run(record.run_dir)
    mats = router_figs.load_matrices(run)
    assert list(mats) == [0] and mats[0][1].shape[0] == 4
    steps, grid = mats[0]
    page = _parse(build_report([record.run_dir]))
    assert {"router_load_over_time.png", "router_curves.png", "loss_and_regularizers.png"} <= set(page.images)
    assert ("entropy/router/load_entropy_norm_min", "moe") in page.cards and ("entropy/router/dead_frac_max", "moe") in page.cards
    share, m = _fewest_carrying(grid[:, -1], 0.9)
    assert m <= 2, grid[:, -1]  # the router did collapse
    assert f"layer L0 routes {100 * share:.0f} % of tokens to {m} of 4 experts at the end (step {int(steps[-1])})" in page.joined
    assert "heatmaps.png" not in page.images  # the monitor's stored load_heatmap is drawn by the router section
