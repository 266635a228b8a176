"""The HTTP service: FastAPI routes over one engine, fed by a micro-batching queue.

`app.py` builds the API; `errors.py` is its one error map and `middleware.py` what runs around every
route; `routes.py` (`/predict`, `/v1/generate`) and `ops.py` (health, readiness, info, metrics) are the
service's own routes. `openai/`, `label_studio/` and `supervisely/` are the other protocols, each one
translating its wire format into engine requests and the results back. `kosmos_serve.asgi` adds the demo.
"""
