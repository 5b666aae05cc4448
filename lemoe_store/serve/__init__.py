"""`lemoe serve`: an OpenAI-compatible server over a store, in which every answer names the edit behind it.

    from lemoe_store.serve import serve
    serve(Repo.open("my-edits"), port=8000)     # blocks until SIGINT/SIGTERM
"""

from __future__ import annotations

import logging
import logging.config

from ..repo import Repo
from ..errors import ConfigError

LOOPBACK = {"127.0.0.1", "localhost", "::1"}

# uvicorn's own configuration, but every logger (access log included) writes to stderr.
LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
    "loggers": {name: {"handlers": ["stderr"], "level": "INFO", "propagate": False}
                for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "lemoe")},
}


class ServeError(ConfigError):
    """A server that must not start as asked (e.g. a public address without an API key)."""


def serve(repo: Repo, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          rev: str = "HEAD", log_prompts: bool = True, max_tokens_cap: int = 512) -> None:
    """Load the base model, then serve until SIGINT/SIGTERM; the audit trail is flushed on the way out."""
    import uvicorn

    from .app import create_app
    from .engine import Engine

    if host not in LOOPBACK and not api_key:
        raise ServeError(f"refusing to bind {host} without --api-key: only 127.0.0.1 is served without one")
    logging.config.dictConfig(LOG_CONFIG)
    engine = Engine(repo, default_rev=rev, max_tokens_cap=max_tokens_cap)
    engine.submit(engine.load).result()  # fail before listening if the base model is wrong
    app = create_app(engine, repo.audit_writer(), api_key=api_key, log_prompts=log_prompts)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_config=LOG_CONFIG, lifespan="on")).run()
