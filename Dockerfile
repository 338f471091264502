# One image, either role:
#   docker run IMAGE serve-shard --host 0.0.0.0 --port 7071 --data-dir /data --name shard-0
#   docker run IMAGE serve-router --host 0.0.0.0 --port 7070 --shard shard-0:7071 ...
#   docker run IMAGE serve --host 0.0.0.0          (router + one shard per core)
# Inside a container the process must listen on 0.0.0.0 to be reachable; outside Docker
# every memstore process binds 127.0.0.1 by default.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY memstore ./memstore
COPY shards ./shards
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --system --home /data memstore && mkdir -p /data && chown memstore /data
USER memstore
WORKDIR /data
VOLUME /data
EXPOSE 7069 7070 7071
# The process the container runs answers the health check: under `serve` the router
# (7070), under `serve-router` its --port, under `serve-shard` its --port: set
# MEMSTORE_PORT to match (compose.yaml does). With TLS, set MEMSTORE_TLS_CA too.
ENV MEMSTORE_PORT=7070
HEALTHCHECK --interval=10s --timeout=5s CMD memstore health --address "127.0.0.1:${MEMSTORE_PORT}"
ENTRYPOINT ["memstore"]
# --insecure: plaintext without tokens, for a private Docker network only. To secure it,
# mount certificates and a token file and run e.g. serve --host 0.0.0.0 --data-dir /data
# --tls-cert /certs/server.pem --tls-key /certs/server.key --auth-file /certs/tokens
# (docs/security.md).
CMD ["serve", "--host", "0.0.0.0", "--data-dir", "/data", "--insecure"]
