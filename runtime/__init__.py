"""The shared runtime: everything every coins service needs and none of their business rules.

config (settings from the environment), db (async engine, transactions), migrations (Alembic per service),
telemetry (OpenTelemetry set-up), errors and status (domain errors and their gRPC form), validation
(protovalidate on every request), idempotency (AIP-155 request ids), pagination (cursor tokens),
clients (traced channels to other services) and server (bootstrap, health, reflection, shutdown).
"""
