"""dynabatch: an LLM serving scheduler sidecar (memory-aware, SLA-constrained dynamic batching).

Subpackages, top to bottom (imports only run downward):
  cli            the `dynabatch` command; the only module importing everything
  bench          trace loaders, simulator, replay, reports
  scheduler_svc  gRPC API, batching loop (policy/ is pure), token relay
  worker_svc     pulls work, runs the engine, streams tokens and feedback
  client         the SDK (sync + async); needs only grpcio and the generated code
  wire           what both services share: queue interface and backends, model registry
  v1             generated protobuf/gRPC code (from protos/dynabatch/v1)
"""
__version__ = "0.1.0"
