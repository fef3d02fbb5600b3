# iex gateway image: slim Python, non-root, data on a volume.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/iex --create-home iex
COPY --from=build /install /usr/local
USER iex
WORKDIR /var/lib/iex
ENV IEX_DATA_DIR=/var/lib/iex/data \
    IEX_PORT=8080 \
    PYTHONUNBUFFERED=1
VOLUME ["/var/lib/iex/data"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"IEX_PORT\", \"8080\")}/readyz', timeout=4)"]
CMD ["iex", "serve", "--host", "0.0.0.0"]
