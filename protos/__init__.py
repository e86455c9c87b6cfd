"""The wire contract shared by agent and console.

`protos.v1` holds the .proto files and the committed generated code; `protos.types`
the plain-Python shapes both sides work with; `protos.serde` is the only module that
touches protobuf message types.
"""
