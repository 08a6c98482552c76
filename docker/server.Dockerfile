# Forseti server image: no torch, no stable-baselines3.
# Build from the repository root: docker build -f docker/server.Dockerfile -t forseti-server .
FROM python:3.11-slim
# uid/gid 10001: deploy/ runs as it. The mount points are the user's, so a new named volume
# (compose) takes that ownership and the sidecar can write to it.
RUN groupadd --gid 10001 forseti && useradd --create-home --uid 10001 --gid 10001 forseti \
    && mkdir -p /models /runs && chown 10001:10001 /models /runs
WORKDIR /opt/forseti
COPY pyproject.toml README.md ./
COPY forseti forseti
COPY server server
COPY exporters exporters
COPY trainer_sidecar trainer_sidecar
COPY loadtests loadtests
RUN pip install --no-cache-dir . && rm -rf /root/.cache
USER 10001:10001
EXPOSE 8000 8001 8002
# The keyring is mounted at run time (a secret), never baked into the image.
ENTRYPOINT ["forseti", "serve"]
CMD ["--model-repository", "/models", "--keyring", "/run/secrets/forseti_keyring", \
     "--model-control-mode", "poll", "--repository-poll-secs", "2", "--http-port", "8000", \
     "--metrics-address", "0.0.0.0"]
