"""Weights files: safetensors with medfed's metadata; pickles refused unopened."""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
from pathlib import Path

import pytest
import torch

from models.tabular import build_tabular_model
from models.weights import FORMAT, WeightsError, WeightsMetadata, load_weights, save_weights

DIGEST = "ab" * 32


def _metadata(kind: str = "logistic", **changes: object) -> WeightsMetadata:
    values: dict[str, object] = {
        "spec_digest": DIGEST,
        "model_kind": kind,
        "features": ("age", "sbp_mean", "bmi_last"),
        "scaling": {"age": (50.0, 15.0), "sbp_mean": (130.0, 20.0)},
        "cohort": {"task": "hypertension_onset", "covariates": ["age", "sbp_mean", "bmi_last"]},
        "hidden": (8, 4) if kind == "mlp" else (),
        "medfed_version": "0.1.0",
    }
    values.update(changes)
    return WeightsMetadata(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_weights_round_trip_tensors_and_metadata(tmp_path: Path, kind: str) -> None:
    metadata = _metadata(kind)
    model = build_tabular_model(kind, 3, hidden=metadata.hidden or (32, 16), seed=3)
    save_weights(tmp_path / "w.safetensors", model.state_dict(), metadata)
    tensors, loaded = load_weights(tmp_path / "w.safetensors")
    assert loaded == metadata
    assert set(tensors) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensors[name], tensor)


def test_metadata_strings_are_named_fields(tmp_path: Path) -> None:
    strings = _metadata().to_strings()
    assert strings["format"] == FORMAT
    assert json.loads(strings["features"]) == ["age", "sbp_mean", "bmi_last"]
    assert json.loads(strings["scaling"]) == {"age": [50.0, 15.0], "sbp_mean": [130.0, 20.0]}
    assert json.loads(strings["cohort"])["task"] == "hypertension_onset"


class _Planted:
    """Unpickling this object creates a marker file: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))  # type: ignore[return-value]


def test_a_pickle_is_refused_without_being_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "UNPICKLED"
    weights = tmp_path / "model.pkl"
    weights.write_bytes(pickle.dumps(_Planted(marker)))
    proof = tmp_path / "PROOF"
    pickle.loads(pickle.dumps(_Planted(proof)))  # the plant works: unpickling creates its marker
    assert proof.exists()
    with pytest.raises(WeightsError, match=r"model\.pkl is a Python pickle"):
        load_weights(weights)
    assert not marker.exists()


def test_a_torch_save_file_is_refused_without_being_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "UNPICKLED"
    weights = tmp_path / "final_model.pt"
    torch.save({"linear.weight": torch.zeros(1, 3), "planted": _Planted(marker)}, weights)
    with pytest.raises(WeightsError, match=r"final_model\.pt is a torch\.save file"):
        load_weights(weights)
    assert not marker.exists()


def test_a_file_that_is_not_safetensors_is_refused(tmp_path: Path) -> None:
    weights = tmp_path / "notes.safetensors"
    weights.write_bytes(b"hello, this is not a model at all")
    with pytest.raises(WeightsError, match=r"notes\.safetensors is not a safetensors file"):
        load_weights(weights)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"absent\.safetensors does not exist"):
        load_weights(tmp_path / "absent.safetensors")


def test_a_safetensors_file_without_medfed_metadata_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    weights = tmp_path / "foreign.safetensors"
    save_file({"linear.weight": torch.zeros(1, 3), "linear.bias": torch.zeros(1)}, weights, metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="lacks the metadata field.*spec_digest.*features"):
        load_weights(weights)


def test_tensors_of_the_wrong_shape_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    weights = tmp_path / "w.safetensors"
    tensors = {"linear.weight": torch.zeros(1, 5), "linear.bias": torch.zeros(1)}
    save_file(tensors, weights, metadata=_metadata().to_strings())
    with pytest.raises(WeightsError, match=r"tensor linear\.weight has shape \[1, 5\], expected \[1, 3\]"):
        load_weights(weights)


def test_save_refuses_tensors_that_are_not_the_described_model(tmp_path: Path) -> None:
    model = build_tabular_model("logistic", 4)
    with pytest.raises(WeightsError, match="shape"):
        save_weights(tmp_path / "w.safetensors", model.state_dict(), _metadata())
    assert not (tmp_path / "w.safetensors").exists()


def test_a_truncated_header_is_refused(tmp_path: Path) -> None:
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(WeightsError, match="not a safetensors file"):
        load_weights(weights)


def test_bad_metadata_names_the_field() -> None:
    with pytest.raises(WeightsError, match="scaling.pulse is not one of the features"):
        _metadata(scaling={"pulse": (0.0, 1.0)})


def test_a_carried_spec_must_hash_to_the_digest() -> None:
    spec = '{"data":{"dataset":"htn"}}'
    digest = hashlib.sha256(spec.encode()).hexdigest()
    assert _metadata(spec_digest=digest, spec_json=spec).spec_json == spec
    with pytest.raises(WeightsError, match="spec does not hash to spec_digest"):
        _metadata(spec_json=spec)
