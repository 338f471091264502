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
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import grpc,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; import os; c=grpc.insecure_channel('127.0.0.1:'+os.environ.get('MEMSTORE_PORT','7071')); sys.exit(0 if g.HealthStub(c).Check(h.HealthCheckRequest(), timeout=2).status==1 else 1)"
ENTRYPOINT ["memstore"]
# --insecure: plaintext without tokens, for a private Docker network only. To secure it,
# mount certificates and a token file and run e.g. serve --host 0.0.0.0 --data-dir /data
# --tls-cert /certs/server.pem --tls-key /certs/server.key --auth-file /certs/tokens
# (docs/security.md).
CMD ["serve", "--host", "0.0.0.0", "--data-dir", "/data", "--insecure"]
