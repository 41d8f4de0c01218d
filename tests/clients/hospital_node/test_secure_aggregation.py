"""The node's side of SecAgg+: routing, the guard on what leaves, the clipping check.

Whole SecAgg+ rounds through the real ClientApp are in tests/federation/test_secure_aggregation.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.hospital_node.rounds import _check_secagg_range, _Request
from clients.hospital_node.secure_aggregation import SECAGG_RECORD, SecAggSettings, secure_aggregation_mod
from federation.protocol import ProtocolError


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 41, 1, 1


def _context() -> Context:
    return Context(run_id=41, node_id=7, node_config={}, state=RecordDict(), run_config={})


def _train(content: RecordDict) -> Message:
    return Message(content=content, dst_node_id=7, message_type="train")


def test_the_secagg_record_is_flowers() -> None:
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    assert SECAGG_RECORD == RECORD_KEY_CONFIGS


def test_a_plain_train_message_bypasses_secaggplus() -> None:
    message = _train(RecordDict({"config": ConfigRecord({"x": 1})}))
    seen = []

    def handler(msg: Message, ctx: Context) -> Message:
        seen.append(msg)
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1.0})}), reply_to=msg)

    reply = secure_aggregation_mod(message, _context(), handler)
    assert seen == [message] and "metrics" in reply.content


def test_a_refusal_in_the_collect_stage_comes_back_as_that_refusal() -> None:
    """The handler's refusal passes through secaggplus_mod unchanged (code and reason)."""
    context = _context()
    setup = ConfigRecord({
        "stage": "setup", "sample_num": 3, "share_num": 3, "threshold": 1, "clipping_range": 8.0,
        "target_range": 1 << 22, "mod_range": 1 << 32, "max_weight": 100.0,
    })
    secure_aggregation_mod(_train(RecordDict({SECAGG_RECORD: setup})), context, lambda m, c: m)
    # Share keys with two made-up neighbours (threshold 1: none of them need answer), so the collect stage runs.
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes

    state = context.state.config_records["secaggplus_state"]
    keys = {str(7): [state["pk1"], state["pk2"]]}
    for node in (8, 9):
        keys[str(node)] = [public_key_to_bytes(generate_key_pairs()[1]), public_key_to_bytes(generate_key_pairs()[1])]
    secure_aggregation_mod(_train(RecordDict({SECAGG_RECORD: ConfigRecord({"stage": "share_keys", **keys})})), context, lambda m, c: m)

    collect = ConfigRecord({"stage": "collect_masked_vectors", "ctxts": [], "srcs": []})
    message = _train(RecordDict({SECAGG_RECORD: collect, "fitins.config": ConfigRecord({})}))

    def refuses(msg: Message, ctx: Context) -> Message:
        return Message(Error(code=4006, reason="hospital_9\tapproval revoked by this node's officer: ethics"), reply_to=msg)

    reply = secure_aggregation_mod(message, context, refuses)
    assert reply.has_error()
    assert (reply.error.code, reply.error.reason) == (4006, "hospital_9\tapproval revoked by this node's officer: ethics")


def _request(clipping: float = 8.0, max_weight: float = 100.0) -> _Request:
    """A collect-stage request: the settings are what the node's own mod took from the setup stage."""
    settings = SecAggSettings(
        sample_num=3, share_num=3, threshold=2, clipping_range=clipping, quantization_range=1 << 22,
        modulus_range=1 << 32, max_weight=max_weight,
    )
    # The coordinator may restate anything in the config: the node does not read it.
    config = ConfigRecord({"medfed.secagg-clipping-range": 1e9, "medfed.secagg-max-weight": 1e9})
    return _Request(config=config, arrays=None, run_id="41", secure=True, secagg=settings)


def _arrays(value: float) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full((2, 3), value, dtype=np.float32)), "b": Array(np.zeros(1, dtype=np.float32))})


def test_an_update_inside_the_clipping_range_is_recorded_as_masked() -> None:
    assert _check_secagg_range(_request(), _arrays(7.9), 100) == {
        "protocol": "SecAgg+", "masked": True, "clipping_range": 8.0, "max_weight": 100.0,
    }
    # Weighting first: 12 * 50/100 = 6 stays inside the range.
    assert _check_secagg_range(_request(), _arrays(-12.0), 50)["masked"] is True


def test_an_update_that_secagg_would_clip_is_not_sent() -> None:
    with pytest.raises(ProtocolError, match=r"beyond the SecAgg\+ clipping range of 8 and would be clipped; nothing was sent"):
        _check_secagg_range(_request(), _arrays(-8.5), 100)


def test_a_weight_above_one_is_refused_without_naming_the_count() -> None:
    with pytest.raises(ProtocolError, match="max_weight is below this node's training size") as info:
        _check_secagg_range(_request(max_weight=100.0), _arrays(0.1), 101)
    assert "101" not in str(info.value)


def test_a_secure_train_message_that_did_not_come_through_the_mod_is_refused() -> None:
    request = _Request(config=ConfigRecord({}), arrays=None, run_id="41", secure=True)
    with pytest.raises(ProtocolError, match="must be SecAgg\\+'s collect stage.*nothing was sent"):
        _check_secagg_range(request, _arrays(0.1), 10)
