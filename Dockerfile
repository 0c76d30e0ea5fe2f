# watcher as a container image: the locked packages (uv.lock) in a venv, tini as PID 1, and an entrypoint that
# runs watcher as PUID:PGID with UMASK (as linuxserver.io images do). README.md, "Container / NAS", tells how
# to run it; compose.yaml (one node) and compose.multinode.yaml (three nodes on PostgreSQL) are examples.
#
#   docker build -t watcher .
#   docker build --build-arg BASE=python:3.13-slim-bookworm -t watcher .
#
# BASE must be Debian-like with python3 (3.11 or newer, with its venv module); tini and tzdata are installed
# when it lacks them. On arm64 (and any platform but x86_64) the image has no local analysis: Essentia has no
# wheel there, so those images analyse through the remote service only.
ARG BASE=python:3.12-slim-bookworm

FROM ${BASE} AS build
ARG UV_VERSION=0.13.10
# uv: never download a Python (the base's is used), compile bytecode at install, and trust the system's
# certificate store (a mirror or proxy with its own CA works once its certificate is in the base).
ENV UV_PYTHON_DOWNLOADS=never UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_NATIVE_TLS=1 UV_NO_PROGRESS=1 \
    UV_PROJECT_ENVIRONMENT=/opt/watcher
RUN python3 -m venv /opt/uv && /opt/uv/bin/pip install --quiet --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}"
WORKDIR /src
COPY pyproject.toml uv.lock README.md LICENSE ./
COPY watcher ./watcher
# Exactly the locked set: the metrics extra everywhere, the local (Essentia) extra where it has wheels.
RUN extras="--extra metrics"; \
    if [ "$(uname -m)" = x86_64 ]; then extras="$extras --extra local"; fi; \
    /opt/uv/bin/uv sync --locked --no-dev --no-editable --no-cache --python python3 $extras \
    && /opt/watcher/bin/watcher --version

FROM ${BASE}
RUN if ! command -v tini >/dev/null 2>&1 || [ ! -e /usr/share/zoneinfo/Etc/UTC ] || ! command -v setpriv >/dev/null 2>&1; then \
      apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends tini tzdata util-linux \
      && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=build /opt/watcher /opt/watcher
COPY docker/entrypoint.sh /usr/local/bin/watcher-entrypoint
COPY docker/config.toml /usr/local/share/watcher/config.toml
# /config holds config.toml and the state folder (store, lock, the page's token); /data is the watched folder.
# Keys: ESSENTIA_API_KEY / NEURALANALOG_API_KEY, or files named essentia_api_key, neuralanalog_api_key and
# pgpass in /run/secrets (compose secrets), read as systemd credentials would be.
ENV PATH=/opt/watcher/bin:$PATH \
    PUID=1000 PGID=1000 UMASK=022 TZ=Etc/UTC \
    WATCHER_CONFIG=/config/config.toml WATCHER_STATE_DIR=/config/state \
    WATCHER_WEB__LISTEN=0.0.0.0:8765 \
    CREDENTIALS_DIRECTORY=/run/secrets \
    PYTHONUNBUFFERED=1
VOLUME ["/config", "/data"]
EXPOSE 8765
# /healthz is open and says only whether the daemon's heartbeat is current; it is served on WATCHER_WEB__LISTEN's port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 CMD ["/opt/watcher/bin/python", "-c", "import os, sys, urllib.request; port = os.environ.get('WATCHER_WEB__LISTEN', ':8765').rpartition(':')[2]; sys.exit(urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status != 200)"]
ENTRYPOINT ["tini", "--", "watcher-entrypoint"]
CMD ["run"]
