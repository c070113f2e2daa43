"""The four coins services. Each is its gRPC layer (api), its rules (domain) and its storage, and talks to
the others only through their protobuf contracts."""
