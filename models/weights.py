"""Model weights a node scores with: a safetensors file of tensors and metadata strings, never pickled code.

``torch.save`` writes a pickle, and loading a pickle runs whatever code it names; a node
must never execute anything that arrived from outside (DESIGN.md, the trust boundary).
A safetensors file is an 8-byte little-endian header length, a JSON header (tensor
names, dtypes, shapes, offsets and a ``__metadata__`` table of strings) and raw tensor
bytes; reading one parses JSON and copies bytes, nothing else.

The metadata ties the weights to what the nodes approved (:class:`WeightsMetadata`):

``format``          ``medfed-weights/1``
``spec_digest``     SHA-256 (hex) of the canonical spec JSON the nodes approved
``model_kind``      ``logistic`` or ``mlp`` (:mod:`models.tabular`)
``hidden``          JSON list of the MLP's hidden widths (``[]`` for logistic)
``features``        JSON list of the feature names, in the model's input order
``scaling``         JSON object ``{feature: [center, scale]}``; a feature becomes ``(x - center) / scale``
``cohort``          JSON of the spec's ``[data.cohort]`` (``null`` when the spec has none)
``medfed_version``  the medfed release that wrote the file
``spec``            (optional) the canonical spec JSON itself; it must hash to ``spec_digest``, so
                    a node whose officer approved the digest before the spec reached it can
                    still read what it approved

:func:`load_weights` refuses, with a message naming the file and what is wrong, a file
that is not safetensors (a pickle or a ``torch.save`` zip is recognised and named as
such, and never unpickled), a missing or malformed metadata field, and tensors whose
names or shapes are not those of the model the metadata describes. No I/O beyond the
one path given.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.tabular import MODEL_KINDS, build_tabular_model

__all__ = ["FORMAT", "METADATA_KEYS", "WeightsError", "WeightsMetadata", "load_weights", "save_weights"]

FORMAT = "medfed-weights/1"
METADATA_KEYS = ("format", "spec_digest", "model_kind", "hidden", "features", "scaling", "cohort", "medfed_version")

# A header larger than this is not one we wrote (safetensors itself caps it at 100 MB).
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_PICKLE_PROTOCOL_OPCODE = 0x80
_ZIP_MAGIC = b"PK\x03\x04"


class WeightsError(ValueError):
    """A weights file that cannot be used: not safetensors, a pickle, bad metadata or tensors."""


@dataclass(frozen=True)
class WeightsMetadata:
    """What a weights file says about itself: the approved spec, the model and its inputs."""

    spec_digest: str
    model_kind: str
    features: tuple[str, ...]
    scaling: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    cohort: Mapping[str, Any] | None = None
    hidden: tuple[int, ...] = ()
    medfed_version: str = ""
    spec_json: str = ""  # the canonical JSON of the spec, when the writer includes it

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        object.__setattr__(self, "scaling", {str(k): (float(c), float(s)) for k, (c, s) in dict(self.scaling).items()})
        problems = []
        if not (isinstance(self.spec_digest, str) and len(self.spec_digest) == 64
                and all(c in "0123456789abcdef" for c in self.spec_digest)):
            problems.append(f"spec_digest must be 64 lower-case hex characters; found {self.spec_digest!r}")
        if self.model_kind not in MODEL_KINDS:
            problems.append(f"model_kind must be one of {', '.join(MODEL_KINDS)}; found {self.model_kind!r}")
        if not self.features or not all(isinstance(f, str) and f for f in self.features):
            problems.append("features must be a non-empty list of feature names")
        elif len(set(self.features)) != len(self.features):
            problems.append("features lists a name more than once")
        for name, (center, scale) in self.scaling.items():
            if name not in self.features:
                problems.append(f"scaling.{name} is not one of the features")
            if not (math.isfinite(center) and math.isfinite(scale) and scale > 0):
                problems.append(f"scaling.{name} must be a finite center and a finite scale > 0")
        if self.spec_json and hashlib.sha256(self.spec_json.encode("utf-8")).hexdigest() != self.spec_digest:
            problems.append("spec does not hash to spec_digest (the weights were altered or mislabelled)")
        if self.model_kind == "logistic" and self.hidden:
            problems.append("hidden applies only to model_kind 'mlp'")
        if problems:
            raise WeightsError("invalid weights metadata: " + "; ".join(problems))

    def to_strings(self) -> dict[str, str]:
        """The safetensors ``__metadata__`` table (strings only)."""
        return {
            "format": FORMAT,
            "spec_digest": self.spec_digest,
            "model_kind": self.model_kind,
            "hidden": json.dumps(list(self.hidden)),
            "features": json.dumps(list(self.features)),
            "scaling": json.dumps({k: [c, s] for k, (c, s) in sorted(self.scaling.items())}, sort_keys=True),
            "cohort": json.dumps(None if self.cohort is None else dict(self.cohort), sort_keys=True),
            "medfed_version": self.medfed_version,
            **({"spec": self.spec_json} if self.spec_json else {}),
        }

    @classmethod
    def from_strings(cls, raw: Mapping[str, str] | None, *, where: str = "weights") -> WeightsMetadata:
        """Parse a ``__metadata__`` table; every missing or malformed field at once, by name."""
        raw = dict(raw or {})
        missing = [key for key in METADATA_KEYS if key not in raw]
        if missing:
            raise WeightsError(
                f"{where} lacks the metadata field(s) {', '.join(missing)}; it was not written by medfed "
                "(the coordinator writes final_model.safetensors with them)"
            )
        if raw["format"] != FORMAT:
            raise WeightsError(f"{where} metadata format is {raw['format']!r}; this node reads {FORMAT!r}")
        parsed: dict[str, Any] = {}
        problems = []
        for key in ("hidden", "features", "scaling", "cohort"):
            try:
                parsed[key] = json.loads(raw[key])
            except json.JSONDecodeError:
                problems.append(f"metadata field {key} is not valid JSON")
        if not problems:
            if not isinstance(parsed["features"], list):
                problems.append("metadata field features must be a JSON list")
            if not isinstance(parsed["hidden"], list) or not all(isinstance(h, int) and h > 0 for h in parsed["hidden"]):
                problems.append("metadata field hidden must be a JSON list of positive integers")
            scaling = parsed["scaling"]
            if not isinstance(scaling, dict) or not all(
                isinstance(v, list) and len(v) == 2 and all(isinstance(x, int | float) for x in v) for v in scaling.values()
            ):
                problems.append("metadata field scaling must map each feature to [center, scale]")
            if parsed["cohort"] is not None and not isinstance(parsed["cohort"], dict):
                problems.append("metadata field cohort must be a JSON object or null")
        if problems:
            raise WeightsError(f"{where}: " + "; ".join(problems))
        try:
            return cls(
                spec_digest=raw["spec_digest"],
                model_kind=raw["model_kind"],
                features=tuple(parsed["features"]),
                scaling={k: (v[0], v[1]) for k, v in parsed["scaling"].items()},
                cohort=parsed["cohort"],
                hidden=tuple(parsed["hidden"]),
                medfed_version=raw["medfed_version"],
                spec_json=raw.get("spec", ""),
            )
        except WeightsError as err:
            raise WeightsError(f"{where}: {err}") from None

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """The tensor names and shapes of the model these metadata describe."""
        hidden = self.hidden if self.model_kind == "mlp" else ()
        kwargs = {"hidden": hidden} if self.model_kind == "mlp" else {}
        model = build_tabular_model(self.model_kind, len(self.features), **kwargs)
        return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _check_shapes(tensors: Mapping[str, torch.Tensor], metadata: WeightsMetadata, where: str) -> None:
    expected = metadata.expected_shapes()
    problems = []
    for name in sorted(set(expected) - set(tensors)):
        problems.append(f"tensor {name} is missing")
    for name in sorted(set(tensors) - set(expected)):
        problems.append(f"tensor {name} is not part of a {metadata.model_kind} model")
    for name in sorted(set(expected) & set(tensors)):
        shape = tuple(tensors[name].shape)
        if shape != expected[name]:
            problems.append(f"tensor {name} has shape {list(shape)}, expected {list(expected[name])}")
    if problems:
        raise WeightsError(
            f"{where} does not hold the {metadata.model_kind} model of its {len(metadata.features)} features: "
            + "; ".join(problems)
        )


def save_weights(path: Path, state_dict: Mapping[str, torch.Tensor], metadata: WeightsMetadata) -> None:
    """Write `state_dict` and `metadata` to `path` as safetensors, atomically.

    Raises
    ------
    WeightsError
        If the tensors are not those of the model `metadata` describes.
    """
    from safetensors.torch import save as save_bytes

    path = Path(path)
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in state_dict.items()}
    _check_shapes(tensors, metadata, str(path))
    data = save_bytes(tensors, metadata=metadata.to_strings())
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def _sniff(data: bytes, where: str) -> None:
    """Refuse what is not safetensors before any parser sees it, naming pickles as such."""
    if data[:4] == _ZIP_MAGIC:
        raise WeightsError(
            f"{where} is a torch.save file (a zip holding a pickle); a node never loads pickled weights. "
            "Use the final_model.safetensors the coordinator writes"
        )
    if data[:1] and data[0] == _PICKLE_PROTOCOL_OPCODE:
        raise WeightsError(
            f"{where} is a Python pickle; a node never loads pickled weights. "
            "Use the final_model.safetensors the coordinator writes"
        )
    if len(data) < 10:
        raise WeightsError(f"{where} is not a safetensors file (too short: {len(data)} bytes)")
    (header,) = struct.unpack("<Q", data[:8])
    if header > min(len(data) - 8, _MAX_HEADER_BYTES) or data[8:9] != b"{":
        raise WeightsError(f"{where} is not a safetensors file (no safetensors header); give the .safetensors weights")


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], WeightsMetadata]:
    """Read a weights file: its tensors by name and its parsed metadata.

    Raises
    ------
    WeightsError
        The file is missing or unreadable, is not safetensors (pickles and ``torch.save``
        files are named as such and never unpickled), lacks or garbles a metadata field,
        or holds tensors that are not the described model's.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    path = Path(path)
    where = f"weights file {path}"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise WeightsError(f"{where} does not exist; give the path of the final_model.safetensors to score with") from None
    except OSError as err:
        raise WeightsError(f"cannot read {where}: {err.strerror or err}") from None
    _sniff(data, where)
    try:
        header_size = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8 : 8 + header_size])
        tensors = load_bytes(data)
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
        raise WeightsError(f"{where} is not a valid safetensors file ({err}); it may be damaged") from None
    raw = header.get("__metadata__") if isinstance(header, dict) else None
    metadata = WeightsMetadata.from_strings(raw, where=where)
    _check_shapes(tensors, metadata, where)
    return tensors, metadata
