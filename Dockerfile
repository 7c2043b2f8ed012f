# syntax=docker/dockerfile:1
# The a3mailer-exporter container image.
#
#   docker build -t a3mailer-exporter .
#   docker run --read-only -v a3m-state:/var/lib/a3mailer-exporter -p 10587:10587 a3mailer-exporter
#
# Two stages: the build stage makes the wheels and the venv with
# scripts/image-venv.sh (the same script tests/integration/test_image.py runs);
# the final stage is a fresh slim Python with only that venv copied in: no pip,
# no compiler, no source tree. It runs as the non-root UID 10587, writes only to
# the state dir (a volume) and needs no writable root filesystem. Kubernetes
# probes (/livez, /readyz) check its health, so the image has no HEALTHCHECK.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter ./exporter
COPY security ./security
COPY scripts/image-venv.sh ./scripts/image-venv.sh
RUN sh scripts/image-venv.sh /src /opt/a3mailer-exporter

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="a3mailer-exporter" \
      org.opencontainers.image.description="Observability and login security for A3Mailer, Postfix and Dovecot" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10587 a3mailer \
 && useradd --system --uid 10587 --gid 10587 --no-create-home \
      --home-dir /var/lib/a3mailer-exporter --shell /usr/sbin/nologin a3mailer \
 && install -d -o 10587 -g 10587 -m 0750 /var/lib/a3mailer-exporter
COPY --from=build /opt/a3mailer-exporter /opt/a3mailer-exporter
ENV PATH=/opt/a3mailer-exporter/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10587:10587
WORKDIR /var/lib/a3mailer-exporter
VOLUME ["/var/lib/a3mailer-exporter"]
EXPOSE 10587
# The exporter drains in-flight requests on SIGTERM (server.graceful_shutdown_timeout).
STOPSIGNAL SIGTERM
ENTRYPOINT ["a3mailer-exporter", "run"]
CMD ["--listen", "0.0.0.0:10587", "--state-dir", "/var/lib/a3mailer-exporter"]
