# dist-engine:latest — the gRPC server, and the same image for KubeRay head and GPU workers.
#   docker build -t dist-engine:latest .
#
# Base: Ray's CUDA image. It brings Python 3.11, Ray (so the server, the head and the workers
# run one Ray version, which Ray Client insists on), bash and wget (KubeRay's probes use them)
# and a non-root user "ray" (uid 1000, gid 100) that owns its conda environment.
# Use a tag that exists for the Ray version you run, and keep RayCluster.spec.rayVersion equal.
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-cu128
FROM ${BASE_IMAGE}

# The build writes build/ and *.egg-info next to the sources, so the folder must belong to the
# user that runs pip; everything from here on runs as that non-root user.
USER root
RUN mkdir -p /opt/dist-engine && chown 1000:100 /opt/dist-engine
USER 1000:100

# A CUDA build of torch first. pyproject.toml only bounds torch (<2.14, which keeps the CPU
# wheel already on the CPU-only development machines) and says nothing about its CUDA build.
# Installing the build we want beforehand makes `pip install .` find the requirement met and
# keep it. cu128 is the first CUDA line with Blackwell kernels (RTX PRO 6000, B200); the wheel
# carries its own CUDA libraries, so the node needs only a recent driver (>= 570).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch>=2.4,<2.14"

WORKDIR /opt/dist-engine
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 dist_engine ./dist_engine
# Not editable: the image holds a built copy, so the source folder could be dropped.
RUN pip install --no-cache-dir . \
    && rm -rf build \
    && python -c "import torch, dist_engine; assert torch.version.cuda, 'CPU torch got installed'"

ENV PYTHONUNBUFFERED=1
EXPOSE 50051 9400
# Plain `docker run dist-engine:latest serve --model ...`; KubeRay replaces this with `ray start`.
ENTRYPOINT ["dist-engine"]
CMD ["--help"]
