"""The HTTP service: FastAPI routes over one engine, fed by a micro-batching queue."""
