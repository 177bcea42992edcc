#!/usr/bin/env bash
# Installs what tests/test_triton_ssd.py and tests/test_triton_step.py need to run mamba-ssm's real Triton
# kernels (the Mamba-2 SSD, the decoding step) on CPU
# under Triton's interpreter: triton, plus mamba-ssm and causal-conv1d built from their source packages
# WITHOUT their CUDA extensions (selective_scan_cuda / causal_conv1d_cuda are never built).
#
#   usage: scripts/install_triton_ssd.sh [VENV]      (`make triton-ssd`, run by `make test`)
#
# They go into their own directory, $VENV/triton-ssd (pip --target), not into the venv's site-packages:
# only the test's child processes put it on sys.path. In the venv itself a mamba_ssm without its CUDA
# extension would be imported, and fail, by transformers' Mamba-2 model on every CPU run (pulling triton
# in), and `pip check` would report mamba-ssm's CUDA-only requirements as missing.
#
# Idempotent: when the pinned versions are already there it only checks them (well under a second).
# Never fails the build: when something cannot be installed (registry down, build error) it prints why,
# records the reason in $VENV/triton-ssd.status and exits 0; the tests then skip with that reason.
#
# Versions (tested together with torch 2.13.0+cpu, Python 3.11):
#   triton 3.7.1        the Triton release torch 2.13.0 is built against (pytorch's triton pin for
#                       v2.13.0); the CPU torch wheel does not depend on triton, so this is our choice.
#                       (triton 3.9.0 was also seen to work; 3.7.1 keeps torch and triton in step.)
#   mamba-ssm 2.3.2.post1, causal-conv1d 1.7.0   sdists from PyPI, their pure-Python part only.
# torch is never touched: every pip call has --no-deps and runs under PIP_CONSTRAINT (the project's
# constraints.txt by default); the sdists build against the venv's torch (--no-build-isolation).
set -uo pipefail

TRITON_VERSION=3.7.1
MAMBA_SSM_VERSION=2.3.2.post1
CAUSAL_CONV1D_VERSION=1.7.0

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv}"
PY="$VENV/bin/python"
TARGET="$VENV/triton-ssd"
STATUS="$VENV/triton-ssd.status"
export PIP_CONSTRAINT="${PIP_CONSTRAINT:-$ROOT/constraints.txt}"
WANT="triton==$TRITON_VERSION mamba-ssm==$MAMBA_SSM_VERSION causal-conv1d==$CAUSAL_CONV1D_VERSION"

installed() {  # what DIR holds, as "triton==… mamba-ssm==… causal-conv1d==…", without importing any of it
    "$PY" - "$1" <<'EOF' 2>/dev/null
import importlib.metadata as m, sys
got = {d.metadata["Name"].lower().replace("_", "-"): d.version for d in m.distributions(path=[sys.argv[1]])}
print(" ".join(f"{n}=={got.get(n, 'none')}" for n in ("triton", "mamba-ssm", "causal-conv1d")))
EOF
}

LOG="$(mktemp)"
NEW="$TARGET.new"
trap 'rm -rf "$LOG" "$NEW"' EXIT

last_error() {  # the line of pip's log that says what went wrong
    { grep -E '^ *(ERROR|error):' "$LOG" || tail -n 1 "$LOG"; } | tail -n 1 | sed 's/^ *//'
}

give_up() {  # say why, leave the reason for the tests' skip message, and do not fail the build
    echo "triton-ssd: $1" >&2
    echo "triton-ssd: tests/test_triton_ssd.py will be skipped (retry with: make triton-ssd)" >&2
    [ -d "$VENV" ] && printf 'failed: %s\n' "$1" >"$STATUS"
    exit 0
}

[ -x "$PY" ] || give_up "no Python at $PY (run make install-test first)"
if [ "$(installed "$TARGET")" = "$WANT" ]; then
    grep -qx "ok $WANT" "$STATUS" 2>/dev/null || printf 'ok %s\n' "$WANT" >"$STATUS"
    exit 0
fi

echo "triton-ssd: installing $WANT into $TARGET (no CUDA build)"
TORCH_BEFORE="$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null)"
PIP=("$PY" -m pip install -q --timeout 30 --retries 1 --no-deps --target "$NEW")
rm -rf "$NEW"

# triton from its wheel (it needs only numpy, which the venv has). `wheel`: the two setup.py files import
# wheel.bdist_wheel, and without build isolation (which would pull a second torch into a build
# environment) it has to be importable here; it stays in the directory, unused by the tests.
EXTRA=()
"$PY" -c 'import einops' 2>/dev/null || EXTRA+=(einops)  # mamba-ssm's one import-time need torch lacks
"${PIP[@]}" "triton==$TRITON_VERSION" wheel "${EXTRA[@]}" >"$LOG" 2>&1 \
    || give_up "pip could not install triton==$TRITON_VERSION: $(last_error)"

# The sdists, built with their CUDA extensions skipped (FORCE_BUILD: build locally, do not look for a
# prebuilt wheel on GitHub). --no-deps: their declared requirements include CUDA-only packages
# (tilelang, quack-kernels) that the Triton SSD kernel does not import.
PYTHONPATH="$NEW${PYTHONPATH:+:$PYTHONPATH}" \
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
    "${PIP[@]}" --no-build-isolation --no-binary :all: \
    "mamba-ssm==$MAMBA_SSM_VERSION" "causal-conv1d==$CAUSAL_CONV1D_VERSION" >"$LOG" 2>&1 \
    || give_up "pip could not build mamba-ssm==$MAMBA_SSM_VERSION / causal-conv1d==$CAUSAL_CONV1D_VERSION from source: $(last_error)"

TORCH_AFTER="$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null)"
[ "$TORCH_BEFORE" = "$TORCH_AFTER" ] || give_up "torch changed from $TORCH_BEFORE to $TORCH_AFTER (check PIP_CONSTRAINT)"
GOT="$(installed "$NEW")"
[ "$GOT" = "$WANT" ] || give_up "installed $GOT, wanted $WANT"
rm -rf "$TARGET" && mv "$NEW" "$TARGET" || give_up "could not move $NEW to $TARGET"
printf 'ok %s\n' "$WANT" >"$STATUS"
echo "triton-ssd: installed $WANT into $TARGET"
