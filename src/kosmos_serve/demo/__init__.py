"""The web demo: a Gradio page at `/demo` of the HTTP service, on the service's own model.

Optional (`pip install -e ".[demo]"`): this module imports without gradio, and the service runs
without the page when gradio is missing. The page lives in `page.py`; what it reads and shows,
gradio-free, in `form.py` and `display.py`.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from fastapi import FastAPI

from kosmos_serve.server.state import ServiceState

DEMO_PATH = "/demo"
INSTALL_HINT = 'The web demo needs gradio: pip install -e ".[demo]"'
EXAMPLES_DIR = Path(__file__).resolve().parents[3] / "examples"  # the repository's examples/ (editable installs)

logger = logging.getLogger("kosmos_serve.demo")


def demo_available() -> bool:
    """Whether gradio is installed."""
    return importlib.util.find_spec("gradio") is not None


def example_images(folder: Path = EXAMPLES_DIR) -> list[Path]:
    """The PNG and JPEG images in `folder`, by name (none when it does not exist)."""
    return sorted(path for path in folder.glob("*") if path.suffix.lower() in {".png", ".jpg", ".jpeg"})


def mount_demo(app: FastAPI, state: ServiceState) -> bool:
    """Serve the demo page at /demo of `app`, on `state`'s model; False, with a log line, when it cannot be."""
    if not demo_available():
        logger.info("Web demo off. %s", INSTALL_HINT)
        return False
    if state.settings.num_api_servers > 1:  # Gradio keeps each session in one process
        logger.warning("Web demo off: it needs a single worker process (NUM_API_SERVERS=1).")
        return False
    from kosmos_serve.demo.page import mount_page  # here, not at the top: the page imports gradio, an optional extra

    mount_page(app, state, DEMO_PATH, example_images())
    return True
