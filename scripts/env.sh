# Sourced by quickstart.sh and test.sh: use the active virtual environment, else create ./.venv,
# and install the package (with the extras in $VQDIFF_EXTRAS) when pyproject.toml changed since last time.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -z "${VIRTUAL_ENV:-}" ]; then
    if [ ! -x .venv/bin/python ]; then
        echo "creating .venv"
        python3 -m venv .venv
    fi
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi
stamp="$VIRTUAL_ENV/.vqdiff-install-${VQDIFF_EXTRAS:-base}"
want="$(cat pyproject.toml; echo "$ROOT")"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "installing vqdiff${VQDIFF_EXTRAS:+[$VQDIFF_EXTRAS]} into $VIRTUAL_ENV (the first time takes a few minutes)"
    python -m pip install -q --upgrade pip
    python -m pip install -q -e ".${VQDIFF_EXTRAS:+[$VQDIFF_EXTRAS]}"
    printf '%s' "$want" > "$stamp"
fi
