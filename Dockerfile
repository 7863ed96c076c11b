# omniroute: slim image, non-root, `omniroute serve`, health-checked on /healthz.
# Configure with OMNIROUTE_* variables (docs: README.md "Configuration"); mount rules.yaml and
# channels.yaml and point OMNIROUTE_RULES_PATH / OMNIROUTE_CHANNELS_PATH at them.
FROM python:3.11-slim AS build
WORKDIR /src
# Dependencies from the lock (hash-checked), in their own layer: the image has exactly what
# CI tested, and a code change does not reinstall them.
COPY requirements/serve.txt ./requirements/serve.txt
RUN python -m venv /opt/omniroute \
    && /opt/omniroute/bin/pip install --no-cache-dir --require-hashes -r requirements/serve.txt
COPY pyproject.toml README.md ./
COPY router ./router
COPY channels ./channels
COPY adapters ./adapters
COPY routing_rules ./routing_rules
COPY migrations ./migrations
RUN /opt/omniroute/bin/pip install --no-cache-dir --no-deps --no-build-isolation .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/omniroute/bin:$PATH \
    OMNIROUTE_HOST=0.0.0.0 OMNIROUTE_PORT=8080 \
    OMNIROUTE_DATA_DIR=/var/lib/omniroute \
    OMNIROUTE_DATABASE_URL=sqlite:////var/lib/omniroute/omniroute.db \
    OMNIROUTE_RULES_PATH=/etc/omniroute/rules.yaml
COPY --from=build /opt/omniroute /opt/omniroute
COPY examples/rules.yaml /etc/omniroute/rules.yaml
RUN useradd --system --uid 10001 --home-dir /var/lib/omniroute --create-home omniroute \
    && chown -R omniroute /var/lib/omniroute
USER omniroute
WORKDIR /var/lib/omniroute
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"
# Migrate, then serve (one process per SQLite file; use PostgreSQL for several).
CMD ["sh", "-c", "omniroute db upgrade && exec omniroute serve"]
