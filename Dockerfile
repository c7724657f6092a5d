# LoRA Studio as a container (a Docker Space, or any host): `docker build -t lora-studio . &&
# docker run -p 7860:7860 lora-studio`. Installs with the same script as a fresh machine
# (scripts/setup.sh; tests/ui/test_setup_script.py replays it), runs as uid 1000 on port 7860.
FROM python:3.11-slim
RUN useradd -m -u 1000 user
USER user
# LORA_STUDIO_RUNS_DIR: point it at persistent storage (/data/runs on a Space with storage).
# Public mode on every interface: a container is reached by others (README, "Public Space");
# `docker run -e LORA_STUDIO_MODE=local ...` for one person behind a login or a private network.
ENV HOME=/home/user PATH=/home/user/app/.venv/bin:$PATH HF_HOME=/home/user/.cache/huggingface \
    GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=7860 GRADIO_ANALYTICS_ENABLED=False \
    LORA_STUDIO_RUNS_DIR=/home/user/app/runs LORA_STUDIO_MODE=public
WORKDIR /home/user/app
COPY --chown=user requirements.txt requirements-dev.txt ./
COPY --chown=user scripts/setup.sh scripts/setup.sh
RUN bash scripts/setup.sh
COPY --chown=user . .
EXPOSE 7860
CMD [".venv/bin/python", "app.py"]
