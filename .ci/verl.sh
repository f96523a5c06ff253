#!/usr/bin/env bash
# CI step: entrotrain's verl adapter against the real verl 0.9.1, in its own venv (.venv-verl).
#
# verl pins transformers<5.11, which the main venv does not satisfy, so verl lives apart. Order matters: CPU torch
# first, then verl under a torch==2.13.0 constraint (checked with --dry-run: verl must not replace torch), then
# entrotrain itself with --no-deps plus its light runtime deps (numpy, einops) and the test tools.
#
# Exit status: 0 = tests passed; 75 = the INSTALL failed (no registry, a wheel missing, pip timed out): the caller
# prints "verl step skipped" and goes on; anything else = a test failed (or the tests timed out): CI must fail.
set -uo pipefail
cd "$(dirname "$0")/.."

SKIP=75
VENV=${VERL_VENV:-.venv-verl}
INSTALL_BUDGET=${VERL_INSTALL_BUDGET:-600}  # seconds for the whole install; past it the step is skipped
TEST_TIMEOUT=${VERL_TEST_TIMEOUT:-300}
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==2.13.0" >"$CONSTRAINTS"

skip() { echo "verl step skipped: $*"; exit "$SKIP"; }

t0=$(date +%s)
deadline=$((t0 + INSTALL_BUDGET))
python3 -m venv "$VENV" || skip "python3 -m venv $VENV failed"
PY="$VENV/bin/python"
left() { echo $((deadline - $(date +%s))); }
pipi() {  # pip install under what is left of the install budget
    local l; l=$(left)
    [ "$l" -gt 0 ] || skip "the install took more than its ${INSTALL_BUDGET} s budget"
    timeout "$l" "$PY" -m pip install --quiet "$@"
}

pipi --upgrade pip || skip "could not upgrade pip (no network to the registry?)"
pipi torch==2.13.0 || skip "pip install torch==2.13.0 failed"
# verl must resolve against the torch we have: a dry run that would touch torch is refused, not installed
[ "$(left)" -gt 0 ] || skip "the install took more than its ${INSTALL_BUDGET} s budget"
plan="$(timeout "$(left)" "$PY" -m pip install --dry-run -c "$CONSTRAINTS" verl==0.9.1 2>&1)" \
    || skip "pip install --dry-run verl==0.9.1 failed: $(echo "$plan" | tail -n 3 | tr '\n' ' ')"
if echo "$plan" | grep -E '^Would install' | grep -qE '(^| )torch-'; then
    skip "verl==0.9.1 would replace torch 2.13.0: $(echo "$plan" | grep -E '^Would install')"
fi
pipi -c "$CONSTRAINTS" verl==0.9.1 || skip "pip install verl==0.9.1 failed"
pipi -c "$CONSTRAINTS" "numpy>=1.24" "einops>=0.8" "pytest>=8" "hypothesis>=6.100" \
    || skip "pip install of entrotrain's light deps / pytest / hypothesis failed"
pipi --no-deps -e . || skip "pip install --no-deps -e . failed"
"$PY" - <<'PY' || skip "the installed verl / torch do not import as expected"
import importlib.metadata as md
import torch
from verl.trainer.ppo.core_algos import get_policy_loss_fn  # noqa: F401
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert md.version("verl") == "0.9.1", md.version("verl")
print(f"verl {md.version('verl')}, torch {torch.__version__}, transformers {md.version('transformers')}")
PY
t1=$(date +%s)
echo "verl step: install took $((t1 - t0)) s"

# --- from here on a failure is a real failure ---
export VERL_REAL_REQUIRED=1  # the test file must not skip for want of verl here
timeout "$TEST_TIMEOUT" "$PY" -m pytest tests/integrations/test_verl_real.py -q -p no:cacheprovider
rc=$?
t2=$(date +%s)
echo "verl step: tests took $((t2 - t1)) s (exit $rc)"
[ "$rc" = "$SKIP" ] && rc=1  # never mistake a test failure for a skipped install
exit "$rc"
