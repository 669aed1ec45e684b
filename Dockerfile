# The gateway (and the terminal emulator, `iso-terminal`) in one image.
#   docker build -t iso-gateway .
#   docker run --rm -p 8583:8583 -v gateway-data:/data iso-gateway
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# An unprivileged user that owns only the data folder (the SQLite ledger lives there). A named volume
# mounted on /data starts with this owner; a bind-mounted host folder keeps its own: chown it to
# 10001:10001 (docs/operations.md, "Containers").
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --shell /usr/sbin/nologin gateway \
    && mkdir /data && chown 10001:10001 /data

# An editable install keeps specs/ next to the packages, where the gateway and the emulator look
# for the wire profiles.
COPY pyproject.toml README.md ./
COPY specs ./specs
COPY gateway ./gateway
COPY terminal_emulator ./terminal_emulator
RUN pip install -e . && python -m compileall -q gateway terminal_emulator

# numeric, so that a runtime can check it is not root without reading /etc/passwd
USER 10001:10001

ENV GATEWAY_LISTEN=0.0.0.0:8583 \
    GATEWAY_LEDGER_URL=sqlite:////data/gateway.db \
    GATEWAY_LOG_FORMAT=json

EXPOSE 8583
VOLUME ["/data"]

# SIGTERM: stop accepting, finish in-flight requests, close the ledger, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["iso-gateway"]
CMD ["serve"]
