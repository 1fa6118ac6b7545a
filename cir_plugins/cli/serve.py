"""``cir-plugins serve``: a local web page over a saved bank and its split's images (see :mod:`cir_plugins.serve`).

    cir-plugins serve --model my_model.py:build --trained runs/stage2 --bank runs/bank.safetensors \\
        --dataset cirr --root data --split val [--faiss runs/bank.faiss | --faiss-export ivfpq] [--port 8000]

Binds 127.0.0.1 unless ``--host`` says otherwise. The model must be the one whose target side made the
bank (checked by fingerprint on two gallery images unless ``--no-bank-check``).
"""

from __future__ import annotations

import argparse
import logging

from .._utils import model_device
from ._common import add_dataset_arguments, add_model_arguments, build_model, load_dataset

__all__ = ["configure", "run"]

logger = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_dataset_arguments(parser, default_split="val")
    parser.add_argument("--bank", required=True, help="bank file from cir-plugins build-bank (over this split)")
    parser.add_argument("--faiss", default=None, metavar="PATH",
                        help="search through this FAISS index (exported from the same bank) instead of exactly")
    parser.add_argument("--faiss-export", default=None, choices=("flat", "ivfpq"),
                        help="export the bank to a FAISS index of this kind first (written to --faiss when given) "
                             "and search through it")
    parser.add_argument("--nprobe", type=int, default=None, help="IVF lists visited per search (ivfpq only)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--max-upload-mb", type=float, default=8.0, help="largest accepted upload (default 8 MB)")
    parser.add_argument("--k", type=int, default=10, help="results shown by default (default 10)")
    parser.add_argument("--max-k", type=int, default=100, help="most results a search may ask for (default 100)")
    parser.add_argument("--no-bank-check", action="store_true",
                        help="skip the check that the model's target side made the bank")


def build_searcher(args: argparse.Namespace):
    """The model, split, bank (and FAISS index) the flags name, as a GallerySearcher."""
    from ..negatives.bank import NegativeBank
    from ..serve import GallerySearcher

    model = build_model(args)
    split = load_dataset(args)
    bank = NegativeBank.load(args.bank, device=model_device(model))
    if not args.no_bank_check:
        sample_ids = [i for i in bank.ids if i in split.images][:2]
        if sample_ids:
            bank.check_compatible(model, sample=split.images.batch(sample_ids))
    index = None
    if args.faiss_export is not None:
        from ..negatives.faiss_index import build_faiss_index

        index = build_faiss_index(bank, args.faiss_export)
        if args.faiss:
            print(f"wrote {index.save(args.faiss)} (FAISS binary) and its .json metadata")
    elif args.faiss:
        from ..negatives.faiss_index import FaissIndex

        index = FaissIndex.load(args.faiss)
    if index is not None and args.nprobe is not None:
        index.set_nprobe(args.nprobe)
    return GallerySearcher(model, bank, split.images, index=index)


def run(args: argparse.Namespace) -> int:
    from ..serve import serve

    searcher = build_searcher(args)
    print(f"serving {len(searcher.gallery_ids)} gallery images ({searcher.index_name}) at "
          f"http://{args.host}:{args.port}/  (Ctrl-C stops)")
    serve(searcher, host=args.host, port=args.port, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
          default_k=args.k, max_k=args.max_k)
    return 0
