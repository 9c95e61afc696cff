"""The gateway's OpenAI-compatible HTTP API (server.py): the same request path as gRPC Generate."""
