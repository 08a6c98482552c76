# Forseti trainer sidecar image: torch (CPU build), stable-baselines3, gymnasium.
# Build from the repository root: docker build -f docker/sidecar.Dockerfile -t forseti-sidecar .
FROM python:3.11-slim
# uid/gid 10001: deploy/ runs as it. The mount points are the user's, so a new named volume
# (compose) takes that ownership and the sidecar can write to it.
RUN groupadd --gid 10001 forseti && useradd --create-home --uid 10001 --gid 10001 forseti \
    && mkdir -p /models /runs && chown 10001:10001 /models /runs
WORKDIR /opt/forseti
# torch's CPU wheel first, so stable-baselines3 never resolves a multi-GB CUDA build.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY forseti forseti
COPY server server
COPY exporters exporters
COPY trainer_sidecar trainer_sidecar
COPY loadtests loadtests
RUN pip install --no-cache-dir '.[train]' && rm -rf /root/.cache
COPY docker/sidecar.toml /etc/forseti/sidecar.toml
USER 10001:10001
EXPOSE 9100
# SIGTERM (docker stop) finishes the current chunk, writes a checkpoint and exits 0;
# --resume picks the run up again after any restart.
STOPSIGNAL SIGTERM
ENTRYPOINT ["forseti", "train", "--continuous", "--resume", "--no-progress"]
CMD ["/etc/forseti/sidecar.toml"]
