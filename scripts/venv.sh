# Create or reuse .venv in the repo root and install the project into it: sourced by the README's
# commands, or run alone (`bash scripts/venv.sh [core|test]`) to set up a machine.
# A stamp of the requirement files' hash makes a second run skip pip entirely.
set -euo pipefail
# Works from the repo root and leaves the caller in its own directory (a relative --workdir stays
# the caller's).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pushd "$ROOT" >/dev/null
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "cleanclip_jax needs Python 3.11+ (its pinned jax, numpy, flax and grain do); $PY is $("$PY" -V 2>&1)." >&2
    echo "Run with PYTHON=python3.11 (or newer)." >&2
    exit 1
  fi
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
hash="$(cat requirements.txt requirements-test.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
want="$hash-${1:-core}"
have="$(cat .venv/.cleanclip_stamp 2>/dev/null || true)"
# A test install holds everything the core one does: demo.sh after test.sh installs nothing.
if [ "$have" != "$want" ] && [ "$have" != "$hash-test" ]; then
  python -m pip install -q --upgrade pip
  if [ "${1:-core}" = "test" ]; then
    python -m pip install -q -r requirements-test.txt
  else
    python -m pip install -q -r requirements.txt
  fi
  python -m pip install -q --no-deps -e .
  echo "$want" > .venv/.cleanclip_stamp
fi
popd >/dev/null
