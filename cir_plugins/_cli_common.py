"""Pieces shared by the subcommand modules: the factory-spec model options and JSON-object options.

Private to the package (the public command modules re-export what they always exposed).
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from .errors import ConfigError, explain

logger = logging.getLogger(__name__)

FACTORY_FIX = 'pass a JSON object, e.g. \'{"dim": 64}\''


def add_factory_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` (a factory spec) and ``--factory-kwargs`` (its JSON keyword arguments)."""
    parser.add_argument("--model", required=True, help="factory spec 'file.py:function' or 'pkg.module:function'")
    parser.add_argument("--factory-kwargs", default="{}", help="JSON object of keyword arguments for the factory")


def parse_json_object(text: str, option: str, fix: str) -> dict:
    """``text`` (the value of ``option``) parsed as a JSON object; ConfigError naming ``option`` otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(explain(f"{option} is not valid JSON", got=text, fix=fix)) from error
    if not isinstance(value, dict):
        raise ConfigError(explain(f"{option} must be a JSON object", got=text))
    return value


def model_from_factory(args: argparse.Namespace) -> Any:
    """``load_factory(args.model)(**json(args.factory_kwargs))``: the factory's model, unwrapped."""
    from ._loading import load_factory

    kwargs = parse_json_object(args.factory_kwargs, "--factory-kwargs", FACTORY_FIX)
    return load_factory(args.model)(**kwargs)
