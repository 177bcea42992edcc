#!/usr/bin/env bash
# Installs what tests/test_triton_ssd.py needs to run mamba-ssm's real Mamba-2 Triton SSD kernel on CPU
# under Triton's interpreter: triton, plus mamba-ssm and causal-conv1d built from their source packages
# WITHOUT their CUDA extensions (selective_scan_cuda / causal_conv1d_cuda are never built).
#
#   usage: scripts/install_triton_ssd.sh [VENV]      (`make triton-ssd`, run by `make test`)
#
# Idempotent: when the pinned versions are already installed it only checks them (well under a second).
# Never fails the build: when something cannot be installed (registry down, build error) it prints why,
# records the reason in $VENV/triton-ssd.status and exits 0; the tests then skip with that reason.
#
# Versions (tested together with torch 2.13.0+cpu, Python 3.11):
#   triton 3.7.1        the Triton release torch 2.13.0 is built against (pytorch's triton pin for
#                       v2.13.0); the CPU torch wheel does not depend on triton, so this is our choice.
#                       (triton 3.9.0 was also seen to work; 3.7.1 keeps torch and triton in step.)
#   mamba-ssm 2.3.2.post1, causal-conv1d 1.7.0   sdists from PyPI, pure-Python part only.
# torch is never touched: pip runs under PIP_CONSTRAINT (the project's constraints.txt by default) and
# with --no-deps for the two sdists.
set -uo pipefail

TRITON_VERSION=3.7.1
MAMBA_SSM_VERSION=2.3.2.post1
CAUSAL_CONV1D_VERSION=1.7.0

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv}"
PY="$VENV/bin/python"
STATUS="$VENV/triton-ssd.status"
export PIP_CONSTRAINT="${PIP_CONSTRAINT:-$ROOT/constraints.txt}"
WANT="triton==$TRITON_VERSION mamba-ssm==$MAMBA_SSM_VERSION causal-conv1d==$CAUSAL_CONV1D_VERSION"

installed() {  # the three versions as "triton==… mamba-ssm==… causal-conv1d==…", without importing them
    "$PY" - <<'EOF' 2>/dev/null
import importlib.metadata as m
def v(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return "none"
print(f"triton=={v('triton')} mamba-ssm=={v('mamba_ssm')} causal-conv1d=={v('causal_conv1d')}")
EOF
}

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
if [ "$(installed)" = "$WANT" ]; then
    [ -f "$STATUS" ] && head -n1 "$STATUS" | grep -qx "ok $WANT" || printf 'ok %s\n' "$WANT" >"$STATUS"
    exit 0
fi

echo "triton-ssd: installing $WANT into $VENV (no CUDA build)"
TORCH_BEFORE="$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null)"
PIP=("$PY" -m pip install -q --timeout 30 --retries 1)
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT

# triton from its wheel; wheel/packaging/setuptools for building the sdists without build isolation
# (build isolation would pull a second torch into the build environment); einops is mamba-ssm's only
# import-time dependency that the project does not already require.
"${PIP[@]}" "triton==$TRITON_VERSION" wheel packaging setuptools einops >"$LOG" 2>&1 \
    || give_up "pip could not install triton==$TRITON_VERSION: $(last_error)"

# The sdists, built with their CUDA extensions skipped (FORCE_BUILD: build locally, do not look for a
# prebuilt wheel on GitHub). --no-deps: their declared dependencies include CUDA-only packages
# (tilelang, quack-kernels) that the Triton SSD kernel does not import.
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
    "${PIP[@]}" --no-deps --no-build-isolation --no-binary :all: \
    "mamba-ssm==$MAMBA_SSM_VERSION" "causal-conv1d==$CAUSAL_CONV1D_VERSION" >"$LOG" 2>&1 \
    || give_up "pip could not build mamba-ssm==$MAMBA_SSM_VERSION / causal-conv1d==$CAUSAL_CONV1D_VERSION from source: $(last_error)"

TORCH_AFTER="$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null)"
[ "$TORCH_BEFORE" = "$TORCH_AFTER" ] || give_up "torch changed from $TORCH_BEFORE to $TORCH_AFTER (check PIP_CONSTRAINT)"
GOT="$(installed)"
[ "$GOT" = "$WANT" ] || give_up "installed $GOT, wanted $WANT"
printf 'ok %s\n' "$WANT" >"$STATUS"
echo "triton-ssd: installed $WANT"
