# chouette-relay container image: `chouette-relay run` as a non-root user, no dev tools inside.
# Build from the repository root: docker build -t chouette-relay:0.1.0 .

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/chouette-relay
ENV PATH=/opt/chouette-relay/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY consumer ./consumer
# Runtime dependencies only: the dev extra stays out of the image.
RUN pip install --upgrade pip && pip install .

FROM python:3.11-slim AS runtime
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
ENTRYPOINT ["chouette-relay"]
CMD ["run"]
