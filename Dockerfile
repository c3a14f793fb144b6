# NexCompute server image: daphne (web), Celery worker and beat all run from it (compose).
# Lint: hadolint Dockerfile (make lint runs it).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Debian's build tools for xmlsec (SAML); versions follow the base image's Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libxmlsec1-dev libxmlsec1-openssl pkg-config gcc \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt constraints.txt ./
RUN pip install -r requirements.txt -c constraints.txt
COPY . .
# Static files are collected at build time (a throw-away key; nothing is signed here).
RUN pip install --no-deps ./agent ./jupyter_ext \
    && DEBUG=1 SECRET_KEY=build-only python manage.py collectstatic --noinput -v0 \
    && useradd --system --uid 10001 --user-group --home-dir /app --no-create-home nexcompute \
    && mkdir -p /app/var/static /var/lib/nexcompute/metrics \
    && chown -R nexcompute:nexcompute /app/var /var/lib/nexcompute

# Never root: the server needs no privilege (the agent, on lab computers, is another matter).
USER 10001:10001
ENV PROMETHEUS_MULTIPROC_DIR=/var/lib/nexcompute/metrics
EXPOSE 8000
# --proxy-headers: the client address and scheme from the reverse proxy (X-Forwarded-For and
# -Proto); only the proxy may reach this port.
CMD ["daphne", "--proxy-headers", "-b", "0.0.0.0", "-p", "8000", "nexcompute.asgi:application"]
