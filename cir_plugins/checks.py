"""One validator per kind of input, shared by the metrics, the bank loss (single-process and sharded) and the
fused kernel; the similarity names are :data:`cir_plugins.protocol.SIMILARITIES`.

Structural checks (type, shape, dtype, device) raise at once. Value checks (row ranges, finiteness, a query
excluding its own target, the temperature's value) are returned as deferred checks, which :func:`settle`
reads back in ONE host sync per call (the bank loss runs every training step); only a failing check
computes its detailed message.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Sequence

import torch

from .errors import ConfigError, DataError, DeviceError, DTypeError, NonFiniteError, ShapeError, explain
from .protocol import SIMILARITIES

__all__ = ["settle", "check_similarity", "check_embeddings", "check_rows", "check_not_excluded", "as_temperature",
           "check_chunk_size", "check_positive_int", "check_positive_ints", "check_probability",
           "dtype_from_name", "dtype_name", "DTYPE_NAMES", "check_ks", "require_images", "FLOAT_DTYPES", "SIMILARITIES"]

# Floating dtypes accepted for embeddings, queries and banks (float64 for tests).
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# A deferred value check: a 0-dim bool tensor that is True on failure, and the error to raise then.
Check = tuple[torch.Tensor, Callable[[], Exception]]


def settle(checks: Sequence[Check]) -> None:
    """Read every deferred check back in one host sync; raise the first failure's error."""
    if not checks:
        return  # no host sync
    failed = torch.stack([flag.reshape(()) for flag, _ in checks]).tolist()
    for bad, (_, error) in zip(failed, checks):
        if bad:
            raise error()


def check_similarity(similarity: str) -> None:
    if similarity not in SIMILARITIES:
        raise ConfigError(explain("unknown similarity", got=similarity, expected=" or ".join(SIMILARITIES),
                                  fix="use 'dot' for (N, D) embeddings and 'max_token' for multi-vector (N, T, D)"))


_FINITE_ROWS_STEP = 65536  # rows per piece of the finiteness check: no mask as large as the gallery is held


def _non_finite_rows(x: torch.Tensor) -> torch.Tensor:
    """(N,) bool, True where row i of x (N, ...) holds a NaN or infinity; computed piece by piece."""
    return torch.cat([~torch.isfinite(piece).flatten(1).all(1) for piece in x.split(_FINITE_ROWS_STEP)])


def _bad_rows(what: str, bad: torch.Tensor) -> Exception:
    rows = bad.nonzero().flatten()[:5].tolist()
    return NonFiniteError(explain(f"{what} contains NaN or infinity", got=f"{what} rows {rows}",
                                  fix="check the model output (learning rate, AMP overflow) or re-embed those images"))


def check_embeddings(query: torch.Tensor, rows: torch.Tensor, similarity: str, *, what: str = "gallery",
                     dtypes: Sequence[torch.dtype] = FLOAT_DTYPES, finite_rows: bool = True) -> list[Check]:
    """Query (Q, D) against ``what`` rows (N, D) for "dot" or (N, T, D) for "max_token": raises at once on a
    wrong type, similarity, layout, size, dtype or device; returns the deferred finiteness checks (of the
    query, and of the rows when ``finite_rows``)."""
    check_similarity(similarity)
    for name, tensor in (("query", query), (what, rows)):
        if not isinstance(tensor, torch.Tensor):
            raise DTypeError(explain(f"{name} must be a torch.Tensor", got=type(tensor).__name__,
                                     fix=f"pass {name} as a tensor"))
        if tensor.dtype not in dtypes:
            raise DTypeError(explain(f"{name} dtype not supported: it must be a floating tensor", got=tensor.dtype,
                                     expected=[str(d) for d in dtypes], fix="cast it with .float() or .bfloat16()"))
    if query.dim() != 2:
        raise ShapeError(explain("query must be 2-D (Q, D)", got=tuple(query.shape),
                                 fix="stack the query embeddings into one (Q, D) tensor"))
    want, layout = (2, "(N, D)") if similarity == "dot" else (3, "(N, T, D)")
    if rows.dim() != want:
        raise ShapeError(explain(f"a {what} for similarity {similarity!r} must be {want}-D {layout}",
                                 got=tuple(rows.shape),
                                 fix="use similarity='max_token' for multi-vector (N, T, D) rows and 'dot' for (N, D)"))
    if query.shape[0] == 0 or rows.shape[0] == 0 or query.shape[1] == 0 or rows.numel() == 0:
        raise ShapeError(explain(f"query and {what} must be non-empty", got=(tuple(query.shape), tuple(rows.shape)),
                                 fix=f"pass at least one query, one {what} row and one embedding dim"))
    if rows.shape[-1] != query.shape[1]:
        raise ShapeError(explain(f"query and {what} embedding dims differ", got=(query.shape[1], rows.shape[-1]),
                                 expected="the same D", fix="embed both with the same model"))
    if rows.device != query.device:
        raise DeviceError(explain(f"query and {what} must be on one device", got=(str(query.device), str(rows.device)),
                                  fix=f"move the {what} with .to(query.device)"))
    bad_q = _non_finite_rows(query)
    checks = [(bad_q.any(), lambda: _bad_rows("query", bad_q))]
    if finite_rows:
        bad_g = _non_finite_rows(rows)
        checks.append((bad_g.any(), lambda: _bad_rows(what, bad_g)))
    return checks


def check_rows(name: str, rows: torch.Tensor | None, n_queries: int, n_rows: int, device, *, padded: bool,
               queries: str = "Q") -> list[Check]:
    """Row indices: (Q,) int64 in [0, n_rows), or (Q, K) with -1 padding when ``padded``; None passes. Raises
    at once on a wrong type, shape or device; returns the deferred range check."""
    if rows is None:
        return []
    if not isinstance(rows, torch.Tensor) or rows.dtype != torch.int64:
        got = rows.dtype if isinstance(rows, torch.Tensor) else type(rows).__name__
        raise DTypeError(explain(f"{name} must be an int64 tensor", got=got, fix="use torch.as_tensor(...).long()"))
    want = f"({queries}, K), -1 padded" if padded else f"({queries},)"
    if rows.dim() != (2 if padded else 1) or rows.shape[0] != n_queries:
        raise ShapeError(explain(f"{name} must be {want} with {queries} = {n_queries} queries", got=tuple(rows.shape),
                                 fix="give one entry (row) per query"))
    if rows.device != device:
        raise DeviceError(explain(f"{name} must be on the query's device", got=str(rows.device), expected=str(device),
                                  fix=f"move {name} with .to(query.device)"))
    out = (rows < (-1 if padded else 0)) | (rows >= n_rows)

    def error():
        where = out.nonzero()[0].tolist()
        return ShapeError(explain(f"{name} out of range", got=f"{int(rows[tuple(where)])} for query {where[0]}",
                                  expected=f"rows in [0, {n_rows})" + (" or -1 as padding" if padded else ""),
                                  fix="index by row" + (" and pad with -1" if padded else "")))
    return [(out.any(), error)]


def check_not_excluded(target_rows: torch.Tensor, exclude_rows: torch.Tensor | None) -> list[Check]:
    """Deferred check that no query excludes its own target row."""
    if exclude_rows is None:
        return []
    clash = (exclude_rows == target_rows[:, None]).any(1)  # (Q,)

    def error():
        bad = clash.nonzero().flatten()[:5].tolist()
        return ConfigError(explain("a query excludes its own target row (the target is among its excluded rows)",
                                   got=f"queries {bad}",
                                   fix="exclude only false negatives such as the reference image, never the target"))
    return [(clash.any(), error)]


def as_temperature(temperature, query: torch.Tensor) -> tuple[torch.Tensor, list[Check]]:
    """A python float or 0-dim float tensor -> (0-dim tensor in the compute dtype: float64 for a float64 query,
    float32 otherwise; a tensor stays in the caller's graph, deferred value check)."""
    cdtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    if isinstance(temperature, torch.Tensor):
        if temperature.dim() != 0:
            raise ShapeError(explain("temperature must be a python float or a 0-dim tensor",
                                     got=tuple(temperature.shape), fix="pass e.g. torch.tensor(0.02)"))
        if not temperature.is_floating_point():
            raise DTypeError(explain("temperature must be a floating tensor", got=temperature.dtype,
                                     fix="use torch.tensor(0.02)"))
        if temperature.device != query.device:
            raise DeviceError(explain("temperature must be on the query's device", got=str(temperature.device),
                                      expected=str(query.device), fix="move the temperature to the model's device"))
        tau = temperature.to(cdtype)
    elif isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        tau = torch.tensor(float(temperature), dtype=cdtype, device=query.device)
    else:
        raise DTypeError(explain("temperature must be a python float or a 0-dim tensor",
                                 got=type(temperature).__name__, fix="pass e.g. 0.02"))
    value = tau.detach()
    return tau, [(~(torch.isfinite(value) & (value > 0)),
                  lambda: ConfigError(explain("temperature must be finite and positive", got=float(value),
                                              expected="> 0", fix="use e.g. 0.02; learn it as exp(log_tau)")))]


def check_positive_int(name: str, value: object, *, minimum: int = 1, allow_none: bool = False,
                       fix: str | None = None) -> None:
    """``value`` must be an int >= ``minimum`` (a bool is not an int here), or None when ``allow_none``."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        wanted = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ConfigError(explain(f"{name} must be {wanted}", got=value, fix=fix))


def check_positive_ints(**values: object) -> None:
    """Each keyword argument must be an int >= 1; the first that is not is a ConfigError naming it."""
    for name, value in values.items():
        check_positive_int(name, value)


def check_chunk_size(chunk_size: int | None) -> None:
    check_positive_int("chunk_size", chunk_size, allow_none=True, fix="leave it None to size chunks automatically")


def check_probability(name: str, value: object, *, open_low: bool = False, open_high: bool = False,
                      fix: str | None = None) -> None:
    """``value`` must be a real number in [0, 1] (ends excluded where asked); a bool is not a number here."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0 \
        and not (open_low and value == 0) and not (open_high and value == 1)
    if not ok:
        span = ("(" if open_low else "[") + "0, 1" + (")" if open_high else "]")
        raise ConfigError(explain(f"{name} must be a number in {span}", got=value, fix=fix))


#: dtype names accepted wherever a dtype is given as text (configs, CLI flags, bank metadata)
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "float64": torch.float64}


def dtype_from_name(name: object, *, allowed: Sequence[torch.dtype] = FLOAT_DTYPES, what: str = "dtype") -> torch.dtype:
    """A torch dtype from its name ("float32", "bf16", ...) or a torch.dtype; ConfigError naming the choices."""
    dtype = name if isinstance(name, torch.dtype) else DTYPE_NAMES.get(str(name).lower().replace("torch.", ""))
    if dtype is None or dtype not in allowed:
        choices = sorted(n for n, d in DTYPE_NAMES.items() if d in allowed)
        raise ConfigError(explain(f"unknown {what}", got=name, expected=choices))
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical name of a dtype ("float32", "bfloat16", ...): the inverse of :func:`dtype_from_name`."""
    return str(dtype).replace("torch.", "")


def check_ks(name: str, ks: Sequence[int]) -> tuple[int, ...]:
    values = tuple(ks) if isinstance(ks, Iterable) else ()
    if not values or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in values):
        raise ConfigError(explain(f"{name} must be a non-empty sequence of positive ints", got=ks,
                                  fix="e.g. (1, 5, 10, 50)"))
    return values


def require_images(images: Container[str], ids: Sequence[str]) -> None:
    """DataError naming the ids that the image mapping ``images`` lacks (all checked before any work)."""
    if missing := [i for i in ids if i not in images]:
        raise DataError(explain(f"{len(missing)} image ids have no image", got=missing[:10],
                                fix="pass an image mapping (e.g. the split's images) that covers every id"))
