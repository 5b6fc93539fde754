# One image for the stream worker and the Dask workers. PyPI's torch wheels for Linux x86_64
# are CUDA builds: the same image runs on GPU hosts (with the NVIDIA container toolkit) and CPUs.
#
#   docker build -t visionstream:0.1.0 .                 # with the gpu extra (dask-cuda)
#   docker build --build-arg EXTRAS= -t visionstream .   # without extras
#
# The build fails when an extra cannot be installed: an image without dask-cuda would only fail
# later, on the GPU hosts, at `dask cuda worker`.
#
#   docker build --target stream -t visionstream-stream:0.1.0 .   # the stream worker alone
#
# The stream worker never runs the model: its image (target `stream`) has no torch, torchvision,
# Pillow, CUDA libraries or compiler (requirements/stream.txt), so a new node pulls a few hundred
# MB instead of gigabytes before a new replica starts. The last stage, the default, is the Dask
# workers' (and the scheduler's) image.

FROM python:3.11-slim AS stream

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY requirements ./requirements
RUN pip install -c requirements/constraints.txt -r requirements/stream.txt
COPY pyproject.toml README.md ./
COPY inference ./inference
COPY streams ./streams
# its dependencies are the ones above: the package alone, without torch
RUN pip install --no-deps . && rm -rf build ./*.egg-info
COPY configs ./configs

RUN useradd --create-home --uid 10001 visionstream && mkdir -p /var/lib/visionstream \
    && chown -R visionstream /var/lib/visionstream
USER visionstream
EXPOSE 6066
CMD ["visionstream", "worker", "--config", "configs/compose.yaml"]


FROM python:3.11-slim AS worker

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_HOME=/models/torch

# g++: a CPU worker builds its compiled forward pass once (model.compile, AOTInductor); without a
# compiler it would stay eager (about 1.4x slower on AVX2, 3x with native bf16)
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements ./requirements
# torch first (its own layer: gigabytes that change rarely), under the same constraints as the rest
RUN pip install -c requirements/constraints.txt torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY inference ./inference
COPY streams ./streams
ARG EXTRAS=gpu
RUN pip install -c requirements/constraints.txt ".${EXTRAS:+[$EXTRAS]}" \
    && rm -rf build ./*.egg-info
COPY configs ./configs

RUN useradd --create-home --uid 10001 visionstream && mkdir -p /models/torch /var/lib/visionstream /var/cache/visionstream \
    && chown -R visionstream /models /var/lib/visionstream /var/cache/visionstream \
    && chmod 0700 /var/cache/visionstream
USER visionstream
EXPOSE 6066 8786 8787 8788
CMD ["visionstream", "worker", "--config", "configs/compose.yaml"]
