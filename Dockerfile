# chatsessions: slim image, non-root, data directory as a volume.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    CHATSESSIONS_DATA_DIR=/data \
    CHATSESSIONS_KEYS_FILE=/data/keys.json

RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin chatsessions \
    && mkdir -p /app /data && chown chatsessions:chatsessions /data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-compile . && rm -rf /root/.cache

USER chatsessions
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz').status != 200)"

# Create a key first: docker run --rm -v data:/data IMAGE chatsessions keys create --tenant acme
CMD ["chatsessions", "serve", "--host", "0.0.0.0", "--port", "8000"]
