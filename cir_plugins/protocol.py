"""The model protocol: what a CIR model must offer, how to wrap one, and how to check it.

A model meets :class:`CIRModel` when it has ``encode_image(images (N, C, H, W)) -> (N, D) or (N, T, D)``
(the target side, frozen in stage 2) and ``compose_query(reference, texts: list[str]) -> (B, D)``.
Optional: ``encode_reference(images (B, C, H, W)) -> Tensor``, frozen reference-side features that
``compose_query`` then receives (:func:`reference_input`), computed once per image id in stage 2; with
``reference_uses_text = True`` it is ``encode_reference(images, texts)`` (e.g. SPRC's fusion pass), cached
per (image id, text) pair; ``similarity`` ("dot", default, or "max_token") says how a query meets a
gallery row. Nothing subclasses anything: :func:`wrap_model` adapts any object in one call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ._utils import eval_mode, tensors_digest
from .errors import CIRPluginsError, ConfigError, ModelProtocolError, explain

__all__ = ["CIRModel", "SIMILARITIES", "CheckReport", "ParameterSplit", "WrappedModel", "as_texts", "check_model",
           "compose", "compose_input_hint", "parameter_split", "reference_input", "reference_uses_text",
           "select_trainable", "similarity_of", "target_fingerprint", "wrap_model"]

logger = logging.getLogger(__name__)

SIMILARITIES = ("dot", "max_token")


@runtime_checkable
class CIRModel(Protocol):
    """Structural type of a CIR model (users never subclass it)."""

    def encode_image(self, images: Tensor) -> Tensor:
        """images (N, C, H, W) -> target embeddings (N, D) or multi-vector (N, T, D)."""

    def compose_query(self, reference: Any, texts: list[str]) -> Tensor:
        """reference features or images for B queries, B texts -> query embeddings (B, D)."""


def require_protocol(model: Any, where: str, methods: Sequence[str] = ("encode_image", "compose_query")) -> None:
    """Raise :class:`ModelProtocolError` naming each of ``methods`` that ``model`` lacks and the fix
    (:func:`wrap_model`); ``where`` names the caller. Every entry point makes this one check."""
    if missing := [m for m in methods if not callable(getattr(model, m, None))]:
        arguments = ", ".join(f"{m}=..." for m in missing)
        raise ModelProtocolError(explain(
            f"{where} needs a CIR model, but {type(model).__name__} has no {' and no '.join(missing)} method",
            fix=f"wrap it once: model = cir_plugins.wrap_model(model, {arguments}) naming the methods (or "
                "functions) that play those roles"))


def as_texts(texts: Any, where: str) -> list[str]:
    """``texts`` as a list of non-empty strings, else :class:`ModelProtocolError` naming ``where``; one
    string (not a list) is refused rather than read as its characters."""
    if isinstance(texts, str):
        raise ModelProtocolError(explain(f"{where} takes a list of texts, one per query, not one string",
                                         got=repr(texts[:60]), fix=f"pass [{texts[:30]!r}]"))
    texts = list(texts)
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ModelProtocolError(explain(f"{where} needs non-empty text strings", got=texts[:3]))
    return texts


def similarity_of(model: Any) -> str:
    """The similarity a model declares (attribute ``similarity``), "dot" when it declares none."""
    similarity = getattr(model, "similarity", "dot")
    if similarity not in SIMILARITIES:
        raise ConfigError(explain(f"{type(model).__name__}.similarity is unknown", got=similarity,
                                  expected=SIMILARITIES,
                                  fix="use 'dot' for (N, D) embeddings or 'max_token' for (N, T, D)"))
    return similarity


def reference_uses_text(model: Any) -> bool:
    """True when the model's ``encode_reference`` reads the texts too (attribute ``reference_uses_text``):
    it is then called as ``encode_reference(images, texts)`` and cached per (image id, text)."""
    flag = getattr(model, "reference_uses_text", False)
    if not isinstance(flag, bool):
        raise ConfigError(explain(f"{type(model).__name__}.reference_uses_text must be a bool", got=flag,
                                  fix="set it to True when encode_reference(images, texts) reads the texts"))
    return flag and callable(getattr(model, "encode_reference", None))


def reference_input(model: Any, images: Tensor, texts: Sequence[str] | None = None) -> Any:
    """What ``compose_query`` receives: ``encode_reference(images)`` when the model has it (with the B
    ``texts`` when it declares ``reference_uses_text``), else the images themselves."""
    encode_reference = getattr(model, "encode_reference", None)
    if not callable(encode_reference):
        return images
    if reference_uses_text(model):
        if texts is None:
            raise ModelProtocolError(explain(
                f"{type(model).__name__}.encode_reference reads the texts (reference_uses_text=True) but none "
                "were given",
                fix="pass the query texts: reference_input(model, images, texts)"))
        return encode_reference(images, list(texts))
    return encode_reference(images)


def compose_input_hint(model: Any, reference: Any) -> str:
    """A sentence saying what ``compose_query`` was given and why, for errors raised inside it (images where
    features were expected, or the reverse, is the usual cause of a shape error)."""
    shape = tuple(reference.shape) if torch.is_tensor(reference) else type(reference).__name__
    if callable(getattr(model, "encode_reference", None)):
        return (f"compose_query was given encode_reference's output {shape}, not the images: a model with "
                "encode_reference receives its output (call compose_query(cir_plugins.protocol.reference_input("
                "model, images), texts)); make compose_query accept that output, or rename encode_reference if "
                "compose_query wants the images")
    return (f"compose_query was given the reference images {shape}, because {type(model).__name__} has no "
            "encode_reference; if compose_query expects features, add encode_reference(images) or pass "
            "wrap_model(model, encode_reference=...)")


def compose(model: Any, reference: Any, texts: list[str]) -> Any:
    """``model.compose_query(reference, texts)``, the one call the library makes; an exception raised inside
    passes through with a note (under its traceback) from :func:`compose_input_hint`."""
    try:
        return model.compose_query(reference, texts)
    except Exception as error:
        if hasattr(error, "add_note") and not isinstance(error, (CIRPluginsError, torch.cuda.OutOfMemoryError)):
            error.add_note("cir_plugins: " + compose_input_hint(model, reference))
        raise


TrainableSpec = Sequence[str] | Callable[[str, nn.Parameter], bool] | Iterable[nn.Parameter] | None


class WrappedModel(nn.Module):
    """A model adapted to :class:`CIRModel` by :func:`wrap_model`; every other attribute is forwarded to the
    wrapped model, the submodule ``model`` (so parameter names carry a ``model.`` prefix)."""

    def __init__(self, model: Any, *, compose_query, encode_image, encode_reference, similarity: str,
                 trainable: TrainableSpec, reference_uses_text: bool | None = None) -> None:
        super().__init__()
        self.model = model  # a submodule when it is an nn.Module, else a plain attribute
        roles = {"compose_query": compose_query, "encode_image": encode_image, "encode_reference": encode_reference}
        self.__dict__["_methods"] = {role: self._resolve(model, role, spec, required=role != "encode_reference")
                                     for role, spec in roles.items()}
        self.__dict__.update(similarity=similarity, trainable_spec=trainable)
        if reference_uses_text is not None:
            self.__dict__["reference_uses_text"] = reference_uses_text

    @staticmethod
    def _resolve(model: Any, role: str, spec: Any, *, required: bool):
        spec = role if spec is None and callable(getattr(model, role, None)) else spec
        if spec is None:
            if required:
                raise ModelProtocolError(explain(
                    f"{type(model).__name__} has no method {role!r} and none was given",
                    expected=f"wrap_model(model, {role}='method_name' or a callable)",
                    fix=f"name the method that plays {role}, or pass a function"))
            return None
        if isinstance(spec, str):
            method = getattr(model, spec, None)
            if not callable(method):
                raise ModelProtocolError(explain(f"{role}={spec!r} does not name a method of {type(model).__name__}",
                                                 got=spec, fix="pass an existing method name or a callable"))
            return method
        if callable(spec):
            return spec
        raise ModelProtocolError(explain(f"{role} must be a method name or a callable", got=type(spec).__name__))

    def encode_image(self, images: Tensor) -> Tensor:
        return self._methods["encode_image"](images)

    def compose_query(self, reference: Any, texts: list[str]) -> Tensor:
        return self._methods["compose_query"](reference, texts)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        if name == "encode_reference":
            method = self.__dict__["_methods"]["encode_reference"]
            if method is None:
                raise AttributeError(f"{type(self.model).__name__} has no encode_reference")
            return method
        if name.startswith("__") or name in ("model", "_methods"):
            raise AttributeError(name)
        model = self.__dict__["model"] if "model" in self.__dict__ else self._modules["model"]
        return getattr(model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def wrap_model(model: Any, *, compose_query=None, encode_image=None, encode_reference=None,
               similarity: str | None = None, trainable: TrainableSpec = None,
               reference_uses_text: bool | None = None) -> Any:
    """Adapt ``model`` (any object, usually an ``nn.Module``) to :class:`CIRModel`; one that already conforms
    and needs no override is returned as is.

    Args:
        compose_query, encode_image, encode_reference: a method name of ``model`` or a callable taking
            the protocol method's arguments; default: the model's method of that name, if any.
        similarity: "dot" (single-vector targets) or "max_token" (multi-vector); default: the model's
            ``similarity`` attribute, else "dot".
        trainable: which parameters stage 2 trains (:func:`select_trainable`: name prefixes relative to
            ``model``, a predicate or the parameters); default: found by a probe (:func:`parameter_split`).
        reference_uses_text: True when ``encode_reference`` takes ``(images, texts)`` (module docstring);
            default: the model's ``reference_uses_text`` attribute, else False.
    """
    if similarity is not None and similarity not in SIMILARITIES:
        raise ConfigError(explain("similarity is unknown", got=similarity, expected=SIMILARITIES))
    if reference_uses_text is not None and not isinstance(reference_uses_text, bool):
        raise ConfigError(explain("reference_uses_text must be a bool or None", got=reference_uses_text))
    overrides = (compose_query, encode_image, encode_reference, similarity, trainable, reference_uses_text)
    conforms = callable(getattr(model, "encode_image", None)) and callable(getattr(model, "compose_query", None))
    if conforms and all(value is None for value in overrides):
        similarity_of(model)  # validates a declared similarity
        return model
    declared = getattr(model, "similarity", None)
    return WrappedModel(model, compose_query=compose_query, encode_image=encode_image,
                        encode_reference=encode_reference,
                        similarity=similarity or (declared if declared in SIMILARITIES else "dot"),
                        trainable=trainable, reference_uses_text=reference_uses_text)


@dataclass(frozen=True)
class ParameterSplit:
    """Parameter names by role in stage 2. query: trained (reached by compose_query only); target: frozen
    (reached by encode_image or encode_reference); unused: reached by neither (or frozen beforehand), frozen."""

    query: tuple[str, ...]
    target: tuple[str, ...]
    unused: tuple[str, ...] = ()
    how: str = "probe"

    def apply(self, model: nn.Module) -> list[nn.Parameter]:
        """Set requires_grad: True on the query side, False elsewhere. Returns the query parameters."""
        query = set(self.query)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name in query)
        return [parameter for name, parameter in model.named_parameters() if name in query]

    def counts(self, model: nn.Module) -> dict[str, int]:
        """Number of scalar parameters in each role."""
        sizes = {name: p.numel() for name, p in model.named_parameters()}
        return {role: sum(sizes[n] for n in getattr(self, role)) for role in ("query", "target", "unused")}


def _named_parameters(model: Any) -> list[tuple[str, nn.Parameter]]:
    return list(model.named_parameters()) if isinstance(model, nn.Module) else []


def select_trainable(model: Any, spec: TrainableSpec) -> tuple[str, ...]:
    """The names of the parameters ``spec`` selects, in the model's order (the one rule for ``trainable=``).

    ``spec``: parameter-name patterns, a predicate ``(name, parameter) -> bool`` or the parameters. A pattern
    selects the names equal to it or starting with it plus a dot ("fuse" selects "fuse.weight", never
    "fuser.weight"; a trailing dot is ignored); for a :class:`WrappedModel` it may be relative ("fuse") or
    carry the ``model.`` prefix, and a predicate receives the relative name. A pattern that selects nothing,
    a foreign parameter or an empty selection is a ConfigError naming it.
    """
    named = _named_parameters(model)
    wrapped = isinstance(model, WrappedModel)

    def own(name: str) -> str:
        return name.removeprefix("model.") if wrapped else name

    def selects(pattern: str, name: str) -> bool:
        pattern = pattern.rstrip(".")
        return any(n == pattern or n.startswith(pattern + ".") for n in {name, own(name)})

    if callable(spec) and not isinstance(spec, (list, tuple, set, nn.Parameter)):
        chosen = {name for name, parameter in named if spec(own(name), parameter)}
    else:
        items = [spec] if isinstance(spec, (str, nn.Parameter)) else list(spec)
        if items and all(isinstance(item, str) for item in items):
            chosen = {name for name, _ in named if any(selects(p, name) for p in items)}
            if unmatched := [p for p in items if not any(selects(p, name) for name, _ in named)]:
                raise ConfigError(explain("trainable names match no parameter", got=unmatched,
                                          expected=sorted({own(n).split(".")[0] for n, _ in named}),
                                          fix="use names or dotted prefixes of the model's parameter names"))
        elif items and all(isinstance(item, nn.Parameter) for item in items):
            ids = {id(item) for item in items}
            chosen = {name for name, parameter in named if id(parameter) in ids}
            if len(chosen) != len(ids):
                raise ConfigError(explain("some trainable parameters do not belong to the model",
                                          got=f"{len(ids) - len(chosen)} foreign parameters",
                                          fix="pass parameters of the model being trained"))
        else:
            raise ConfigError(explain("trainable must be names, a predicate or parameters",
                                      got=[type(item).__name__ for item in items[:3]]))
    if not chosen:
        raise ConfigError(explain("the trainable override selects no parameter", got=spec,
                                  fix="check the names or the predicate"))
    return tuple(name for name, _ in named if name in chosen)


def _reached(output: Any, named: list[tuple[str, nn.Parameter]]) -> set[str]:
    outputs = output if isinstance(output, (tuple, list)) else [output]
    tensors = [t for t in outputs if torch.is_tensor(t) and t.requires_grad]
    if not tensors or not named:
        return set()
    total = sum(t.float().sum() for t in tensors)
    grads = torch.autograd.grad(total, [p for _, p in named], allow_unused=True)
    return {name for (name, _), grad in zip(named, grads) if grad is not None}


def parameter_split(model: Any, reference_images: Tensor, texts: list[str], target_images: Tensor) -> ParameterSplit:
    """Which parameters stage 2 trains (the query side) and freezes (the target side), from a few
    reference_images (B, C, H, W), their B texts and target_images (N, C, H, W).

    A ``trainable`` override given to :func:`wrap_model` decides; otherwise a probe runs each method once
    in eval mode and follows the gradient: what ``encode_image`` or ``encode_reference`` reach is the
    target side, what else ``compose_query`` reaches the query side; parameters already frozen are unused.
    Model modes, parameter flags, ``.grad`` and the RNG are left as they were.
    """
    spec = getattr(model, "trainable_spec", None) if isinstance(model, WrappedModel) else None
    if spec is not None:
        query = select_trainable(model, spec)
        return ParameterSplit(query=query, target=tuple(n for n, _ in _named_parameters(model) if n not in query),
                              how="override")
    require_protocol(model, "parameter_split")
    texts = as_texts(texts, "parameter_split")
    named = [(n, p) for n, p in _named_parameters(model) if p.requires_grad]
    frozen_before = tuple(n for n, p in _named_parameters(model) if not p.requires_grad)
    with eval_mode(model), torch.random.fork_rng(devices=[]), torch.enable_grad():
        target = _reached(model.encode_image(target_images), named)
        reference = reference_input(model, reference_images, list(texts))
        if reference is not reference_images:
            target |= _reached(reference, named)
            reference = reference.detach() if torch.is_tensor(reference) else reference
        composed = _reached(model.compose_query(reference, list(texts)), named)
    names = [n for n, _ in named]
    return ParameterSplit(query=tuple(n for n in names if n in composed and n not in target),
                          target=tuple(n for n in names if n in target),
                          unused=tuple(n for n in names if n not in composed and n not in target) + frozen_before)


def target_fingerprint(model: nn.Module, split: ParameterSplit) -> str:
    """A hash of the target-side weights (names, shapes, dtypes, values) and their modules' buffers (e.g.
    batch-norm statistics): equal only for target sides that would embed images identically."""
    params = dict(model.named_parameters())
    owners = {name.rsplit(".", 1)[0] for name in split.target if "." in name}
    buffers = [(n, b) for n, b in model.named_buffers() if "." in n and n.rsplit(".", 1)[0] in owners]
    return tensors_digest(sorted([(n, params[n]) for n in split.target] + buffers, key=lambda item: item[0]))


@dataclass
class CheckReport:
    """What :func:`check_model` found. ``ok`` is True when ``problems`` is empty."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    image_shape: tuple[int, ...] | None = None
    reference_shape: tuple[int, ...] | None = None
    query_shape: tuple[int, ...] | None = None
    similarity: str | None = None
    trainable_parameters: int = 0
    frozen_parameters: int = 0
    split: ParameterSplit | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_failed(self) -> CheckReport:
        if self.problems:
            raise ModelProtocolError("check_model found problems:\n- " + "\n- ".join(self.problems))
        return self

    def __str__(self) -> str:
        lines = [f"check_model: {'OK' if self.ok else f'{len(self.problems)} problem(s)'}",
                 f"  encode_image -> {self.image_shape}, compose_query -> {self.query_shape}, "
                 f"reference features -> {self.reference_shape}, similarity {self.similarity!r}",
                 f"  trainable (query side) parameters: {self.trainable_parameters:,}; "
                 f"frozen (target side and unused): {self.frozen_parameters:,}"]
        lines += [f"  PROBLEM: {p}" for p in self.problems] + [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _check_tensor(report: CheckReport, what: str, value: Any, *, ranks: tuple[int, ...], batch: int,
                  fix: str) -> Tensor | None:
    if not torch.is_tensor(value):
        report.problems.append(f"{what} returned {type(value).__name__}, expected a torch.Tensor. Fix: {fix}.")
        return None
    if not value.is_floating_point():
        report.problems.append(f"{what} returned dtype {value.dtype}, expected a floating-point tensor. "
                               "Fix: return embeddings, not token ids or indices.")
    if value.dim() not in ranks:
        report.problems.append(f"{what} returned shape {tuple(value.shape)} (rank {value.dim()}), expected rank "
                               f"{' or '.join(map(str, ranks))}. Fix: {fix}.")
    elif value.shape[0] != batch:
        report.problems.append(f"{what} returned {value.shape[0]} rows for a batch of {batch}. "
                               "Fix: return one embedding per input (check for a squeeze or a pooled batch).")
    if value.is_floating_point() and not torch.isfinite(value).all():
        bad = int((~torch.isfinite(value)).sum())
        report.problems.append(f"{what} returned {bad} NaN/inf values. Fix: check the inputs' normalisation, "
                               "the dtype (fp16 overflow) and the weights.")
    return value


def check_model(model: Any, reference: Tensor, texts: Sequence[str], targets: Tensor) -> CheckReport:
    """Dry-run a model on reference (B, C, H, W) images, B texts and targets (N, C, H, W); name every problem
    in words a user can act on.

    Raises :class:`ModelProtocolError` when the model lacks a protocol method, ``texts`` is not a list of
    non-empty strings, or the model raises (naming the method and, for compose_query, what it was given).
    Returns a :class:`CheckReport` (``.raise_if_failed()`` turns problems into an error) on types, dtypes,
    ranks, batch sizes, finiteness, devices, the query/gallery dimension, the similarity against the target
    rank, a differentiable query, and that stage 2 trains at least one parameter (trainable/frozen counts).
    """
    require_protocol(model, "check_model")
    texts = as_texts(texts, "check_model")
    report = CheckReport()
    if reference.shape[0] != len(texts):
        raise ModelProtocolError(explain("check_model got different numbers of references and texts",
                                         got=(reference.shape[0], len(texts)), fix="pass one text per reference"))
    try:
        report.similarity = similarity_of(model)
    except ConfigError as error:
        report.problems.append(str(error))
    stage, ref = "encode_image", None  # the step running, named in the error when the model raises
    try:  # eval mode: no dropout noise, no batch-norm statistics updated by a dry run
        with eval_mode(model), torch.random.fork_rng(devices=[]), torch.enable_grad():
            image = _check_tensor(report, "encode_image", model.encode_image(targets), ranks=(2, 3),
                                  batch=targets.shape[0], fix="return (N, D), or (N, T, D) for multi-vector targets")
            stage = "encode_reference"
            ref = reference_input(model, reference, texts)
            if ref is not reference:
                report.reference_shape = tuple(ref.shape) if torch.is_tensor(ref) else None
                report.notes.append("encode_reference present: stage 2 caches it once per "
                                    + ("(image id, text) pair" if reference_uses_text(model) else "image id"))
            stage = "compose_query"
            query = _check_tensor(report, "compose_query", model.compose_query(ref, texts), ranks=(2,),
                                  batch=len(texts), fix="return one (B, D) embedding per query")
    except Exception as error:  # the user's code raised: say where, keep the original as the cause
        cause = f"check_model: {stage} raised {type(error).__name__}: {error}"
        if stage == "compose_query":
            cause += ". " + compose_input_hint(model, ref)
        raise ModelProtocolError(cause) from error
    report.image_shape = tuple(image.shape) if image is not None else None
    report.query_shape = tuple(query.shape) if query is not None else None
    if image is not None and query is not None and image.dim() in (2, 3) and query.dim() == 2:
        if image.shape[-1] != query.shape[-1]:
            report.problems.append(f"the query dimension {query.shape[-1]} differs from the image dimension "
                                   f"{image.shape[-1]}. Fix: project both into the same embedding space.")
        if image.device != query.device:
            report.problems.append(f"encode_image returns on {image.device} but compose_query on {query.device}. "
                                   "Fix: keep the model on one device.")
        if report.similarity == "dot" and image.dim() == 3:
            report.problems.append(f"encode_image returns multi-vector {tuple(image.shape)} but similarity is 'dot'. "
                                   "Fix: wrap_model(model, similarity='max_token').")
        if report.similarity == "max_token" and image.dim() == 2:
            report.problems.append(f"similarity is 'max_token' but encode_image returns {tuple(image.shape)}. "
                                   "Fix: return (N, T, D) tokens or use similarity='dot'.")
        if not query.requires_grad:
            report.problems.append("compose_query's output does not require grad, so nothing can be trained. "
                                   "Fix: remove torch.no_grad()/detach() from the query path.")
    if isinstance(model, nn.Module) and not report.problems:
        split = parameter_split(model, reference, texts, targets)
        counts, report.split = split.counts(model), split
        report.trainable_parameters, report.frozen_parameters = counts["query"], counts["target"] + counts["unused"]
        if not split.query:
            report.problems.append("no parameter is on the query side: everything compose_query reaches is also "
                                   "reached by encode_image. Fix: pass trainable=... to wrap_model.")
    return report
