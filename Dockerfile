# iex gateway image: slim Python, non-root, data on a volume.
FROM python:3.11-slim AS build
WORKDIR /src
# The runtime set of uv.lock, exactly as tested, into a virtualenv copied whole to the image.
COPY tools/uv-requirements.txt tools/
RUN pip install --no-cache-dir --require-hashes --no-deps -r tools/uv-requirements.txt
ENV UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/iex \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1
COPY pyproject.toml uv.lock ./
RUN uv sync --locked --no-install-project --no-editable --python /usr/local/bin/python3
COPY README.md ./
COPY app ./app
RUN uv sync --locked --no-editable --python /usr/local/bin/python3

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/iex --create-home iex
COPY --from=build /opt/iex /opt/iex
USER iex
WORKDIR /var/lib/iex
ENV PATH=/opt/iex/bin:$PATH \
    IEX_DATA_DIR=/var/lib/iex/data \
    IEX_PORT=8080 \
    PYTHONUNBUFFERED=1
VOLUME ["/var/lib/iex/data"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"IEX_PORT\", \"8080\")}/readyz', timeout=4)"]
CMD ["iex", "serve", "--host", "0.0.0.0"]
