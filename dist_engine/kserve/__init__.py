"""Generated KServe v2 / Triton stubs (see protos/dist_engine/kserve/grpc_service.proto)."""
