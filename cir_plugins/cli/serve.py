"""``cir-plugins serve``: a local web page over a saved bank and its split's images (see :mod:`cir_plugins.serve`).

    cir-plugins serve --model my_model.py:build --trained runs/stage2 --bank runs/bank_val.safetensors \\
        --dataset cirr --root data --split val [--faiss runs/bank.faiss | --faiss-export auto] [--port 8000]

The bank must cover the images of ``--split``, made by this model's target side (checked by fingerprint on two
gallery images unless ``--no-bank-check``). Binds 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import math

from .._utils import model_device
from ..errors import ConfigError, explain
from ._common import add_dataset_arguments, add_model_arguments, build_model, load_dataset

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    from ..serve import DEFAULT_REQUEST_TIMEOUT
    from ..serve.app import DEFAULT_QUEUE, DEFAULT_WORKERS
    from ..serve.searcher import DEFAULT_UPLOAD_PIXELS

    add_model_arguments(parser)
    add_dataset_arguments(parser, default_split="val")
    parser.add_argument("--bank", required=True,
                        help="bank file from cir-plugins build-bank over the images of this --split")
    parser.add_argument("--faiss", default=None, metavar="PATH",
                        help="search through this FAISS index (exported from the same bank) instead of exactly")
    parser.add_argument("--faiss-export", default=None, choices=("auto", "flat", "ivfpq"),
                        help="export the bank to a FAISS index of this kind first (written to --faiss when given) "
                             "and search through it; auto: exact (flat) below 100,000 rows, else ivfpq, whose "
                             "measured recall is printed")
    parser.add_argument("--nprobe", type=int, default=None,
                        help="IVF lists visited per search (an ivfpq index given by --faiss or --faiss-export)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="a host name the page may be opened at besides 127.0.0.1, localhost and --host "
                             "(repeatable; e.g. this machine's name when binding 0.0.0.0)")
    parser.add_argument("--port", type=int, default=8000, help="port, 1-65535 (default 8000)")
    parser.add_argument("--max-upload-mb", type=float, default=8.0, help="largest accepted upload (default 8 MB)")
    parser.add_argument("--max-upload-pixels", type=int, default=DEFAULT_UPLOAD_PIXELS,
                        help=f"largest accepted upload in pixels, checked before decoding (default "
                             f"{DEFAULT_UPLOAD_PIXELS:,}; the gallery's own limit is higher)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help=f"threads that decode images and run the model (default {DEFAULT_WORKERS})")
    parser.add_argument("--queue", type=int, default=DEFAULT_QUEUE,
                        help=f"searches that may wait for a worker; more are answered 503 (default {DEFAULT_QUEUE})")
    parser.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT,
                        help=f"seconds within which a request's headers and body must arrive, else the connection "
                             f"is closed (default {DEFAULT_REQUEST_TIMEOUT:g})")
    parser.add_argument("--k", type=int, default=10, help="results shown by default (default 10)")
    parser.add_argument("--max-k", type=int, default=100, help="most results a search may ask for (default 100)")
    parser.add_argument("--no-bank-check", action="store_true",
                        help="skip the check that the model's target side made the bank")


def _check_flags(args: argparse.Namespace) -> None:
    """ConfigError naming the flag for a value the server cannot run with (before anything is loaded)."""
    if not 1 <= args.port <= 65535:
        raise ConfigError(explain("--port must be a TCP port", got=args.port, expected="1..65535"))
    if not (math.isfinite(args.max_upload_mb) and args.max_upload_mb > 0):
        raise ConfigError(explain("--max-upload-mb must be a positive number", got=args.max_upload_mb, fix="e.g. 8"))
    if not (math.isfinite(args.request_timeout) and args.request_timeout > 0):
        raise ConfigError(explain("--request-timeout must be a positive number of seconds", got=args.request_timeout))
    for flag, value, low in (("--max-upload-pixels", args.max_upload_pixels, 1), ("--workers", args.workers, 1),
                             ("--queue", args.queue, 0), ("--k", args.k, 1), ("--max-k", args.max_k, 1)):
        if value < low:
            raise ConfigError(explain(f"{flag} must be >= {low}", got=value))
    if args.nprobe is not None and args.faiss is None and args.faiss_export is None:
        raise ConfigError(explain("--nprobe applies to a FAISS index", got=f"--nprobe {args.nprobe} without an index",
                                  fix="add --faiss PATH or --faiss-export ivfpq, or leave out --nprobe"))


def build_searcher(args: argparse.Namespace):
    """The model, split, bank (and FAISS index) the flags name, as a GallerySearcher."""
    from ..negatives.bank import NegativeBank
    from ..negatives.faiss_index import FaissIndex, build_faiss_index
    from ..serve import GallerySearcher

    _check_flags(args)
    model = build_model(args)
    split = load_dataset(args)
    bank = NegativeBank.load(args.bank, device=model_device(model))
    if not args.no_bank_check and (sample_ids := [i for i in bank.ids if i in split.images][:2]):
        bank.check_compatible(model, sample=split.images.batch(sample_ids))
    index = None
    if args.faiss_export is not None:
        index = build_faiss_index(bank, args.faiss_export)
    elif args.faiss:
        index = FaissIndex.load(args.faiss)
    if index is not None and args.nprobe is not None:
        index.set_nprobe(args.nprobe)
        if index.recall is not None:
            index.measure_recall(bank.embeddings)
    if index is not None and index.recall is not None:
        print(f"{index.factory}: recall@{index.recall['k']} {index.recall['recall']:.3f} against exact search "
              f"({index.recall['queries']} bank rows as queries, nprobe {index.recall['nprobe']})")
    searcher = GallerySearcher(model, bank, split.images, index=index, max_pixels=args.max_upload_pixels)
    if args.faiss_export is not None and args.faiss:
        print(f"wrote {index.save(args.faiss)} (FAISS binary) and its .json metadata")
    return searcher


def run(args: argparse.Namespace) -> int:
    from ..serve import serve
    from ..serve.app import LOCAL_HOSTS

    searcher = build_searcher(args)
    print(f"serving {len(searcher.gallery_ids)} gallery images ({searcher.index_name}) at "
          f"http://{args.host}:{args.port}/  (Ctrl-C stops)")
    hosts = tuple(dict.fromkeys((*LOCAL_HOSTS, args.host, *args.allow_host)))
    serve(searcher, host=args.host, port=args.port, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
          default_k=args.k, max_k=args.max_k, workers=args.workers, queue=args.queue,
          request_timeout=args.request_timeout, allowed_hosts=hosts)
    return 0
