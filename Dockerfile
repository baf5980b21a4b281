# cxr-embed service image: CPU inference, the shipped model inside the package, no downloads at run time.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    CXR_EMBED_HOST=0.0.0.0 CXR_EMBED_PORT=8000
WORKDIR /app

# CPU wheels of the pinned torch/torchvision keep the image small; everything else from pyproject.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY cxr_embed ./cxr_embed
COPY probes ./probes
COPY service ./service
RUN pip install . && cxr-embed --help >/dev/null && cxr-embed models

# Mount saved probes at /probes and a store at /data/store.h5 to enable them:
#   docker run -p 8000:8000 -v $PWD/probes:/probes -e CXR_EMBED_PROBES=/probes cxr-embed
RUN useradd --create-home cxr
USER cxr
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"
CMD ["cxr-embed", "serve"]
