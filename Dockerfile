# cxr-embed service images: CPU inference, the shipped model inside the package, no downloads at run time.
#   docker build -t cxr-embed .                      full image (PyTorch CPU): every command, --runtime torch
#   docker build --target slim -t cxr-embed:slim .   slim image, no PyTorch: OpenVINO on the ONNX exports
#                                                    shipped in the wheel (README, "A slim serving install")
# Both run `cxr-embed serve` on port 8000; mount probes at /probes and set CXR_EMBED_PROBES=/probes:
#   docker run -p 8000:8000 -v $PWD/probes:/probes -e CXR_EMBED_PROBES=/probes cxr-embed

FROM python:3.11-slim AS base
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    CXR_EMBED_HOST=0.0.0.0 CXR_EMBED_PORT=8000
WORKDIR /app
RUN useradd --create-home cxr

# The package as a wheel, built once for both images (its files: pyproject's package data).
FROM base AS wheel
COPY pyproject.toml README.md ./
COPY cxr_embed ./cxr_embed
COPY probes ./probes
COPY service ./service
RUN pip wheel --no-deps -w /wheels .

# Slim: requirements/slim.txt (the list tests/test_slim.py installs and checks), then the wheel without
# its dependencies (which would pull PyTorch). The build fails if torch got in anyway.
FROM base AS slim
COPY requirements/slim.txt /tmp/slim.txt
RUN pip install -r /tmp/slim.txt && rm /tmp/slim.txt
COPY --from=wheel /wheels /wheels
RUN pip install --no-deps /wheels/*.whl && rm -rf /wheels \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
    && cxr-embed --help >/dev/null && cxr-embed models
ENV CXR_EMBED_BACKEND=openvino
USER cxr
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"
CMD ["cxr-embed", "serve"]

# Full (the default target, last): CPU wheels of the pinned torch/torchvision keep the image small;
# everything else from the wheel's own dependencies.
FROM base AS full
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1
COPY --from=wheel /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels && cxr-embed --help >/dev/null && cxr-embed models
USER cxr
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"
CMD ["cxr-embed", "serve"]
