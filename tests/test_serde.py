"""The contract round-trips, rejects malformed bytes, and agrees with the .proto enum."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protos import serde
from protos.types import METRIC_NAMES, Description, Gap, GpuInfo, SubscribeRequest, WireError
from tests.helpers import make_frame


def test_metric_names_match_proto_enum() -> None:
    assert serde.metric_names_from_proto() == list(METRIC_NAMES)


def test_frame_roundtrip_keeps_every_field_and_nan() -> None:
    f = make_frame(n_gpus=3, seq=7)
    f.gpu_values[1, 4] = np.nan
    g = serde.decode_frame(serde.encode_frame(f))
    assert (g.host, g.epoch, g.seq, g.simulated) == ("h1", "e1", 7, True)
    np.testing.assert_array_equal(np.isnan(g.gpu_values), np.isnan(f.gpu_values))
    assert math.isnan(g.gpu_values[1, 4])
    assert g.train[0].extra == {"mfu": pytest.approx(0.4)}
    assert g.events[0].attrs == {"xid": "79"}
    assert g.processes[0].pid == 4242


def test_wrapped_frame_decodes_as_stream_item() -> None:
    f = make_frame(seq=3)
    item = serde.decode_stream_item(serde.wrap_frame(serde.encode_frame(f)))
    assert not isinstance(item, Gap) and item.seq == 3


def test_large_frame_wraps_with_multibyte_length() -> None:
    f = make_frame(n_gpus=64)
    f.train = f.train * 200
    data = serde.encode_frame(f)
    assert len(data) > 16384
    item = serde.decode_stream_item(serde.wrap_frame(data))
    assert not isinstance(item, Gap) and len(item.train) == 200


def test_gap_roundtrip() -> None:
    item = serde.decode_stream_item(serde.encode_gap(Gap("e", 5, 9, "evicted", 1)))
    assert item == Gap("e", 5, 9, "evicted", 1)


def test_subscribe_and_describe_roundtrip() -> None:
    req = SubscribeRequest("e", 42, False)
    assert serde.decode_subscribe_request(serde.encode_subscribe_request(req)) == req
    d = Description("h", "0.1", "e", True, [GpuInfo(0, "n", "u", 80.0, "d", "p")], ["x"],
                    list(METRIC_NAMES), 1, 1.0, 1, 5, "simulated")
    assert serde.decode_description(serde.encode_description(d)) == d


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda f: setattr(f, "host", ""), "no host"),
        (lambda f: setattr(f, "epoch", ""), "no epoch"),
        (lambda f: setattr(f, "metric_schema", 99), "unknown metric schema"),
    ],
)
def test_invalid_frames_rejected(mutate, message) -> None:  # type: ignore[no-untyped-def]
    f = make_frame()
    mutate(f)
    with pytest.raises(WireError, match=message):
        serde.decode_frame(serde.encode_frame(f))


def test_truncated_values_rejected() -> None:
    from protos.v1 import telemetry_pb2

    msg = telemetry_pb2.Frame()
    msg.ParseFromString(serde.encode_frame(make_frame()))
    msg.gpu_values = msg.gpu_values[:-4]
    with pytest.raises(WireError, match="gpu_values holds"):
        serde.decode_frame(msg.SerializeToString())


@given(st.binary(max_size=512))
def test_random_bytes_never_crash_the_parser(data: bytes) -> None:
    try:
        item = serde.decode_stream_item(data)
    except WireError:
        return
    # Anything accepted must be a well-formed frame or gap.
    if isinstance(item, Gap):
        assert item.epoch and item.first_seq >= 1
    else:
        assert item.host and item.epoch and item.seq >= 1


def test_protobuf_uses_fast_backend() -> None:
    assert serde.protobuf_backend() == "upb"
