"""A local web page over a saved bank: composed search in a browser (``cir-plugins serve``).

:class:`GallerySearcher` (no web dependency) searches the bank for a reference image and a text;
:func:`create_app` (Starlette, the ``serve`` extra) puts a page and a JSON endpoint in front of it; :func:`serve`
runs it with uvicorn on 127.0.0.1 unless told otherwise, each request under a deadline (:func:`server_config`).
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import ConfigError, explain
from .searcher import GallerySearcher, decode_image_bytes

__all__ = ["GallerySearcher", "create_app", "decode_image_bytes", "serve", "server_config", "DEFAULT_REQUEST_TIMEOUT"]

logger = logging.getLogger(__name__)

#: seconds within which a request's headers and body must arrive (from the connection's start or the previous answer)
DEFAULT_REQUEST_TIMEOUT = 10.0


def create_app(searcher: GallerySearcher, **kwargs: Any):
    """The Starlette app (see :mod:`cir_plugins.serve.app`)."""
    from .app import create_app as _create_app

    return _create_app(searcher, **kwargs)


def _uvicorn():
    try:
        import uvicorn
    except ImportError as error:
        raise ConfigError(explain("serving needs uvicorn", got="import uvicorn failed",
                                  fix='pip install "cir-plugins[serve]"')) from error
    return uvicorn


def _deadline_protocol(request_timeout: float):
    """uvicorn's h11 protocol with a deadline: a request's headers and body must arrive within ``request_timeout``
    seconds of the connection opening or of the previous answer, else the connection is closed (a client sending a
    byte every few seconds holds no connection for ever). The app's time to answer is not limited."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineH11Protocol(H11Protocol):
        _deadline = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(request_timeout, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            cycle = self.cycle
            receiving = cycle is None or cycle.response_complete or cycle.more_body
            if receiving and not self.transport.is_closing():
                logger.info("closed a connection from %s: its request did not arrive within %.1f s", self.client,
                            request_timeout)
                self.transport.close()

    return DeadlineH11Protocol


def server_config(app: Any, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                  request_timeout: float = DEFAULT_REQUEST_TIMEOUT, **uvicorn_kwargs: Any):
    """The ``uvicorn.Config`` :func:`serve` runs ``app`` with: the h11 protocol with the request deadline, and a
    5 s keep-alive. ``uvicorn.Server(server_config(app, port=0)).run()`` in a thread serves it in tests."""
    uvicorn = _uvicorn()
    if isinstance(request_timeout, bool) or not isinstance(request_timeout, (int, float)) \
            or not 0 < request_timeout < float("inf"):
        raise ConfigError(explain("request_timeout must be a positive number of seconds", got=request_timeout))
    http = _deadline_protocol(float(request_timeout))
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=http,
                          **{"timeout_keep_alive": 5, **uvicorn_kwargs})


def serve(searcher: GallerySearcher, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          request_timeout: float = DEFAULT_REQUEST_TIMEOUT, **app_kwargs: Any) -> None:
    """Run the page with uvicorn until interrupted (binds ``host``: the local machine only by default). Requests
    addressed to another host name than 127.0.0.1, localhost, ::1 or ``host`` are refused (``allowed_hosts=``)."""
    from .app import LOCAL_HOSTS

    app_kwargs.setdefault("allowed_hosts", tuple(dict.fromkeys((*LOCAL_HOSTS, host))))
    app = create_app(searcher, **app_kwargs)
    _uvicorn().Server(server_config(app, host=host, port=port, log_level=log_level,
                                    request_timeout=request_timeout)).run()
