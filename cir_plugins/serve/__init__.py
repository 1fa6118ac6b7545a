"""A local web page over a saved bank: composed search in a browser (``cir-plugins serve``).

:class:`GallerySearcher` (no web dependency) composes a query from a gallery image or an upload and a
text, and searches the bank exactly or through a FAISS index; :func:`create_app` (Starlette, the
``serve`` extra) puts a page and a JSON endpoint in front of it; :func:`serve` runs it with uvicorn
on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

from typing import Any

from .searcher import GallerySearcher, decode_image_bytes

__all__ = ["GallerySearcher", "create_app", "decode_image_bytes", "serve"]


def create_app(searcher: GallerySearcher, **kwargs: Any):
    """The Starlette app (see :mod:`cir_plugins.serve.app`)."""
    from .app import create_app as _create_app

    return _create_app(searcher, **kwargs)


def serve(searcher: GallerySearcher, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          **app_kwargs: Any) -> None:
    """Run the page with uvicorn until interrupted (binds ``host``: the local machine only by default)."""
    from ..errors import ConfigError, explain

    try:
        import uvicorn
    except ImportError as error:
        raise ConfigError(explain("serving needs uvicorn", got="import uvicorn failed",
                                  fix='pip install "cir-plugins[serve]"')) from error
    uvicorn.run(create_app(searcher, **app_kwargs), host=host, port=port, log_level=log_level)
