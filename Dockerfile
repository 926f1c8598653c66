# hybrid-serve on Ray's images: CPU (head, CPU workers, laptops) and GPU (vLLM workers).
#
#   CPU: docker build -t hybrid-serve:0.1.0-cpu .
#   GPU: docker build -t hybrid-serve:0.1.0-gpu \
#          --build-arg BASE=rayproject/ray-llm:2.60.0-py311-cu128 --build-arg TARGET=gpu .
#
# The Ray version of BASE must match `k8s.ray_version` (KubeRay's rayVersion) and the Ray the
# package resolves to; the default BASE is the Ray this project is tested with.
ARG BASE=rayproject/ray:2.60.0-py311-cpu
FROM ${BASE}
ARG TARGET=cpu

USER root
# llama-cpp-python builds llama.cpp from source.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*
USER ray

# llama.cpp is compiled for a portable x86-64-v3 baseline (AVX2, FMA, F16C), not for the build
# machine (GGML_NATIVE): an image runs on whatever nodes the cluster has, and a native build from
# an AMX builder would carry llama.cpp's AMX path, which crashes (llama.cpp issue 20824).
ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
ENV CMAKE_ARGS=${LLAMA_CMAKE_ARGS}

WORKDIR /home/ray/hybrid-serve
COPY --chown=ray:users pyproject.toml README.md constraints.txt ./
COPY --chown=ray:users hybrid_serve ./hybrid_serve
COPY --chown=ray:users agents ./agents
COPY --chown=ray:users benchmarks ./benchmarks
COPY --chown=ray:users cluster ./cluster
COPY --chown=ray:users deployments ./deployments
COPY --chown=ray:users engines ./engines
COPY --chown=ray:users retrieval ./retrieval

# CPU: torch stays on its CPU build (constraints.txt). GPU: the base image's CUDA torch and vLLM
# are kept, and FAISS for CUDA replaces faiss-cpu (both install the `faiss` module).
RUN if [ "$TARGET" = "gpu" ]; then \
      pip install --no-cache-dir . \
      && pip uninstall -y faiss-cpu \
      && pip install --no-cache-dir "faiss-gpu-cu12>=1.8"; \
    else \
      pip install --no-cache-dir -c constraints.txt .; \
    fi \
 && python -c "import hybrid_serve.deployments.app, hybrid_serve.cluster.cli"
EXPOSE 8000
# KubeRay supplies the `ray start` command; outside Kubernetes the image runs the local cluster.
CMD ["hybrid-serve", "up", "--host", "0.0.0.0"]
