#!/bin/sh
# The container's entry (under tini): as root, make /config ready, then run watcher as PUID:PGID with UMASK,
# as linuxserver.io images do; started as another user (docker run --user), run watcher as that user.
# On a first start with no /config/config.toml, a starter config that watches /data is put there.
set -eu
PUID="${PUID:-1000}" PGID="${PGID:-1000}" UMASK="${UMASK:-022}"
case "$PUID:$PGID" in
  *[!0-9:]* | :* | *:) echo "watcher: PUID and PGID must be numeric ids (PUID=$PUID PGID=$PGID); not starting" >&2; exit 2 ;;
esac
case "$UMASK" in
  [0-7][0-7][0-7] | [0-7][0-7][0-7][0-7]) umask "$UMASK" ;;
  *) echo "watcher: UMASK must be octal, for example 022 or 002 (UMASK=$UMASK); not starting" >&2; exit 2 ;;
esac
config="${WATCHER_CONFIG:-/config/config.toml}"
state="${WATCHER_STATE_DIR:-/config/state}"
if [ "$(id -u)" != 0 ]; then
  mkdir -p "$state"
  [ -e "$config" ] || cp /usr/local/share/watcher/config.toml "$config"
  exec watcher "$@"
fi
mkdir -p "$state"
if [ ! -e "$config" ]; then
  cp /usr/local/share/watcher/config.toml "$config"
  chown "$PUID:$PGID" "$config"
  echo "watcher: wrote a starter config to $config (it watches /data); edit it and restart the container" >&2
fi
# The state folder belongs to the user watcher runs as; it is changed only when it does not already.
if [ "$(stat -c %u:%g "$state")" != "$PUID:$PGID" ]; then
  chown -R "$PUID:$PGID" "$state"
fi
exec setpriv --reuid="$PUID" --regid="$PGID" --clear-groups --no-new-privs --inh-caps=-all --bounding-set=-all \
  -- watcher "$@"
