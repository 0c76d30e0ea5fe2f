# Shared by bin/watcher, bin/test and bin/upgrade-deps: make sure .venv holds exactly the locked set (uv.lock)
# with the given extras. uv itself is pinned: it is installed once into .tools/ from the package index.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${WATCHER_VENV:-$root/.venv}"
UV_VERSION="0.13.10"
# Never download a Python build: use the interpreter given (PYTHON) or python3 on PATH.
export UV_PYTHON_DOWNLOADS=never UV_PROJECT_ENVIRONMENT="$venv" UV_NO_PROGRESS=1

# The pinned uv: $UV if set, else .tools/uv-VERSION (made with pip, which every Python has).
find_uv() {
  local python="$1" tools="$root/.tools/uv-$UV_VERSION"
  if [ -n "${UV:-}" ]; then uv="$UV"; return; fi
  if [ ! -x "$tools/bin/uv" ]; then
    echo "installing uv $UV_VERSION into $tools ..." >&2
    "$python" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target "$tools" "uv==$UV_VERSION" >&2
  fi
  uv="$tools/bin/uv"
}

bootstrap() {
  local extras="$1" python="${PYTHON:-python3}" stamp args=()
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "watcher needs Python 3.11 or newer; set PYTHON=/path/to/python3.11 (found: $("$python" --version 2>&1))" >&2
    exit 2
  fi
  stamp="$venv/.installed-$(echo "$extras" | tr ',' '-')-$(cat "$root/uv.lock" "$root/pyproject.toml" | cksum | cut -d' ' -f1)"
  [ -f "$stamp" ] && return 0
  find_uv "$python"
  local extra
  for extra in ${extras//,/ }; do args+=(--extra "$extra"); done
  echo "installing the locked watcher[$extras] into $venv ..." >&2
  if ! "$uv" sync --quiet --locked --python "$python" "${args[@]}" >&2; then
    if [[ "$extras" == *local* ]]; then
      echo "the local analysis extra (Essentia) has no wheel for this platform; installing without it" >&2
      args=()
      for extra in ${extras//,/ }; do [ "$extra" = local ] || args+=(--extra "$extra"); done
      "$uv" sync --quiet --locked --python "$python" "${args[@]}" >&2
    else
      exit 3
    fi
  fi
  rm -f "$venv"/.installed-*
  touch "$stamp"
}
