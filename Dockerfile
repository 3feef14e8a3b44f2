# livedge: one edge node (HTTP + LL-HLS, WebSocket ingest, gossip, WebRTC ingest).
#
# Build with scripts/build-image (see deploy/README.md): it puts livedge's wheel and the wheels of
# every pinned runtime dependency (deploy/constraints.txt) in build/wheels on the host, because pip
# inside `docker build` may have no package index; on a machine without a registry it also builds
# the base image from Debian packages under the tag FROM names below.
#
# The base may be the official image (Python in /usr/local/bin) or the local Debian one (Python in
# /usr/bin): nothing here names the interpreter's path, only `python3` on PATH and the virtualenv.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
# The legacy builder keeps this stage as an untagged image; scripts/build-image removes it by label.
LABEL org.livedge.stage=build
# A folder inside the build context holding livedge-*.whl and a wheel for every line of
# deploy/constraints.txt.
ARG WHEELS=build/wheels
COPY deploy/constraints.txt /tmp/constraints.txt
COPY ${WHEELS}/ /tmp/wheels/
# Exact versions only, from the given wheels only; then livedge without resolving again, and
# `pip check` fails the build if the pins do not satisfy livedge on this base's Python.
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels \
        --requirement /tmp/constraints.txt \
    && /opt/venv/bin/pip install --no-cache-dir --no-index --no-deps /tmp/wheels/livedge-*.whl \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/pip uninstall --yes --quiet pip setuptools

FROM ${BASE_IMAGE} AS runtime
# A fixed numeric id, so Kubernetes' runAsNonRoot can check it and volumes can be chowned to it.
RUN groupadd --gid 10001 livedge \
    && useradd --uid 10001 --gid livedge --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin livedge
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=3000 \
    WS_PORT=3001
USER 10001:10001

# 3000 HTTP (LL-HLS, API, probes, metrics); 3001 WebSocket ingest; 7946 gossip (TCP and UDP).
# WebRTC (WHIP) media is UDP on ports the ICE agent picks from the kernel's ephemeral range: run
# with host networking, or narrow the range to 40000-40099 with
# --sysctl net.ipv4.ip_local_port_range="40000 40099" and publish it 1:1 (deploy/README.md).
EXPOSE 3000/tcp 3001/tcp 7946/tcp 7946/udp 40000-40099/udp

# /healthz answers while the process serves; curl is not in the image, python3 is.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '3000') + '/healthz', timeout=2)"]

# SIGTERM drains (not ready, no new publishes, up to DRAIN_SECONDS) and exits 0; give the runtime's
# stop timeout a few seconds more than DRAIN_SECONDS.
STOPSIGNAL SIGTERM
ENTRYPOINT ["livedge"]
CMD ["serve"]
