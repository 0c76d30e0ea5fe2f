# Shared by bin/watcher and bin/test: make sure .venv exists and holds the project with the given extras.
# Re-installs only when pyproject.toml changed since the last install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${WATCHER_VENV:-$root/.venv}"

bootstrap() {
  local extras="$1" stamp
  local python="${PYTHON:-python3}"
  if [ ! -x "$venv/bin/python" ]; then
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "watcher needs Python 3.11 or newer; set PYTHON=/path/to/python3.11 (found: $("$python" --version 2>&1))" >&2
      exit 2
    fi
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
  fi
  stamp="$venv/.installed-$(echo "$extras" | tr ',' '-')-$(cksum < "$root/pyproject.toml" | cut -d' ' -f1)"
  if [ ! -f "$stamp" ]; then
    echo "installing watcher[$extras] into $venv ..." >&2
    if ! "$venv/bin/python" -m pip install --quiet -e "$root[$extras]" >&2; then
      if [[ "$extras" == *local* ]]; then
        echo "the local analysis extra (Essentia) has no wheel for this platform; installing without it" >&2
        extras="${extras//local/}"; extras="${extras//,,/,}"; extras="${extras#,}"; extras="${extras%,}"
        "$venv/bin/python" -m pip install --quiet -e "$root${extras:+[$extras]}" >&2
      else
        exit 3
      fi
    fi
    touch "$stamp"
  fi
}
