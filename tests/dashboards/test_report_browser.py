"""The report of a short recipe run, opened in headless Chromium: every figure loads and the key numbers show.

Skipped when no Chromium is installed (CI installs Debian's ``chromium``). The screenshot is kept as a test
artefact in ``$ENTROTRAIN_ARTIFACTS`` (default ``tests/artifacts/``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from entrotrain.cli import main  # noqa: E402
from entrotrain.dashboards.report import build_report  # noqa: E402
from entrotrain.dashboards.report_template import fmt  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)

#: Appended to a copy of the page: after load, write each image's decoded width into the DOM for --dump-dom.
PROBE = """<script>
window.addEventListener("load", function () {
  var out = [];
  document.querySelectorAll("img").forEach(function (img) {
    img.setAttribute("data-natural-width", String(img.naturalWidth));
    out.push(img.getAttribute("src") + "=" + img.naturalWidth);
  });
  var done = document.createElement("pre");
  done.id = "probe-result";
  done.textContent = out.join(";");
  document.body.appendChild(done);
});
</script>"""


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=True)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (`apt-get install chromium`)")
def test_report_of_a_recipe_run_renders_in_chromium(tmp_path):
    main(
        [
            "fit",
            "--config",
            str(ROOT / "recipes" / "attention_collapse.yaml"),
            "--trainer.max_steps=26",  # the monitor logs every 25 steps: two logging steps
            "--trainer.enable_progress_bar=false",
            "--trainer.limit_val_batches=1",
            "--trainer.val_check_interval=13",
            "--model.init_args.n_layer=2",  # a smaller GPT: the same recipe, a faster test
            "--model.init_args.n_embd=64",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    (run_dir,) = (tmp_path / "records").iterdir()
    index = build_report([run_dir])

    probe = index.with_name("probe.html")
    probe.write_text(index.read_text().replace("</body>", PROBE + "</body>"))
    dom = _chromium("--dump-dom", probe.as_uri(), profile=tmp_path / "profile").stdout
    result = re.search(r'<pre id="probe-result">(.*?)</pre>', dom, re.S)
    assert result, dom[-2000:]
    widths = dict(item.rsplit("=", 1) for item in result.group(1).split(";"))
    pngs = sorted(p.name for p in index.parent.glob("*.png"))
    assert sorted(widths) == pngs and len(pngs) >= 4
    assert all(int(w) > 100 for w in widths.values()), widths  # every figure decoded

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    values = [r["values"]["entropy/attn_norm/min"] for r in rows if "entropy/attn_norm/min" in r["values"]]
    assert len(values) == 2
    assert f"{fmt(values[0])} → {fmt(values[-1])}" in dom  # the key numbers, as rendered
    assert "attention_collapse" in dom and "What happened" in dom and "Heads over time" in dom

    artifacts = Path(os.environ.get("ENTROTRAIN_ARTIFACTS", ROOT / "tests" / "artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "report_attention_collapse_screenshot.png"
    _chromium("--window-size=1280,2600", f"--screenshot={shot}", index.as_uri(), profile=tmp_path / "profile")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
