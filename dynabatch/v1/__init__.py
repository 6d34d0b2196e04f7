"""Generated protobuf and gRPC code for the dynabatch.v1 proto package (tools/gen_protos.py)."""
