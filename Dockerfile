# chouette-relay container image: `chouette-relay run` as a non-root user, runtime dependencies only.
# Build from the repository root: docker build -t chouette-relay:0.1.0 .
#
# The base image is pinned by digest, since a tag such as 3.11-slim moves under you. Replace the
# placeholder below once, and again whenever you choose to take a new base, with the digest of the
# multi-platform index: `docker buildx imagetools inspect python:3.11-slim` prints it ("Digest:").
# Until then the build stops on the placeholder; --build-arg PYTHON_BASE=... overrides it.
ARG PYTHON_BASE=python:3.11-slim@sha256:REPLACE-WITH-THE-DIGEST-OF-python-3.11-slim

FROM ${PYTHON_BASE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements/runtime.txt requirements/build.txt ./requirements/
COPY docker/build-venv.sh ./docker/
COPY pyproject.toml README.md ./
COPY consumer ./consumer
# requirements/runtime.txt with its hashes, then the relay's wheel: no dev or local extras, no pip.
RUN sh docker/build-venv.sh /src /opt/chouette-relay

FROM ${PYTHON_BASE} AS runtime
ENV PATH=/opt/chouette-relay/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# A fixed numeric uid/gid so that Kubernetes can check runAsNonRoot.
RUN groupadd --system --gid 10001 relay \
    && useradd --system --uid 10001 --gid relay --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin relay
COPY --from=build /opt/chouette-relay /opt/chouette-relay
WORKDIR /tmp
USER 10001:10001
EXPOSE 8080
# No init process (tini): the relay runs as PID 1 and handles SIGTERM and SIGINT itself (drain,
# commit, leave the group; consumer/app.py), and `run` starts no child process, so there is no
# zombie to reap. The exec form keeps it PID 1; a shell form would put /bin/sh there instead,
# which does not pass SIGTERM on.
STOPSIGNAL SIGTERM
ENTRYPOINT ["chouette-relay"]
CMD ["run"]
