# One image for the stream worker and the Dask workers. PyPI's torch wheels for Linux x86_64
# are CUDA builds: the same image runs on GPU hosts (with the NVIDIA container toolkit) and CPUs.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_HOME=/models/torch

WORKDIR /app
RUN pip install torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY requirements ./requirements
COPY inference ./inference
COPY streams ./streams
COPY configs ./configs
RUN pip install -c requirements/constraints.txt -e '.[gpu]' || pip install -c requirements/constraints.txt -e .

RUN useradd --create-home --uid 10001 visionstream && mkdir -p /models/torch /var/lib/visionstream \
    && chown -R visionstream /models /var/lib/visionstream
USER visionstream
EXPOSE 6066 8786 8787
CMD ["visionstream", "worker", "--config", "configs/compose.yaml"]
