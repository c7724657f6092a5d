# LoRA Studio as a container (e.g. a Docker Space). Installs with the same script as a fresh machine.
FROM python:3.11-slim
RUN useradd -m -u 1000 user
USER user
ENV HOME=/home/user PATH=/home/user/app/.venv/bin:$PATH HF_HOME=/home/user/.cache/huggingface \
    GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=7860
WORKDIR /home/user/app
COPY --chown=user requirements.txt requirements-dev.txt ./
COPY --chown=user scripts/setup.sh scripts/setup.sh
RUN bash scripts/setup.sh
COPY --chown=user . .
EXPOSE 7860
CMD [".venv/bin/python", "app.py"]
