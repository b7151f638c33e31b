"""A client compiled from the founding document's proto calls Predict and gets the right answers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest

from support import in_process


def _predict_error(stub: Any, request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(request, timeout=10)
    return caught.value


def test_64_concurrent_callers_each_get_their_own_answer(
    demo_stub: Any, seed: SimpleNamespace, demo_repo: Path
) -> None:
    reference = in_process(demo_repo / "recsys" / "1" / "model.pt")
    rng = np.random.default_rng(1)
    inputs = rng.standard_normal((64, 256), dtype=np.float32)
    calls = [
        demo_stub.Predict.future(seed.pb2.PredictRequest(inputs=row.tolist())) for row in inputs
    ]
    answers = np.array([list(call.result(timeout=30).outputs) for call in calls], dtype=np.float32)
    expected = reference(inputs)
    assert answers.shape == (64, 1)
    np.testing.assert_allclose(answers, expected, rtol=1e-5, atol=1e-6)
    # Distinct inputs give distinct answers, so a mixed-up answer could not pass the check above.
    assert len(np.unique(answers)) == 64


def test_a_request_of_several_items_gets_all_their_outputs_flattened(
    demo_stub: Any, seed: SimpleNamespace, demo_repo: Path
) -> None:
    items = np.random.default_rng(2).standard_normal((5, 256), dtype=np.float32)
    response = demo_stub.Predict(seed.pb2.PredictRequest(inputs=items.ravel().tolist()), timeout=10)
    expected = in_process(demo_repo / "recsys" / "1" / "model.pt")(items).ravel()
    np.testing.assert_allclose(response.outputs, expected, rtol=1e-5, atol=1e-6)
    assert response.processing_time_ms >= 0


def test_raw_inputs_are_answered_with_raw_outputs(demo_server: Any, demo_repo: Path) -> None:
    # The seed's client knows nothing of raw_inputs: use torchwire's own messages, which add it.
    from torchwire._proto.modelservice_messages_pb2 import PredictRequest, PredictResponse

    items = np.random.default_rng(3).standard_normal((3, 256), dtype=np.float32)
    with grpc.insecure_channel(demo_server.target) as channel:
        predict = channel.unary_unary(
            "/ModelService/Predict",
            request_serializer=PredictRequest.SerializeToString,
            response_deserializer=PredictResponse.FromString,
        )
        response = predict(PredictRequest(raw_inputs=items.astype("<f4").tobytes()), timeout=10)
    assert len(response.outputs) == 0
    outputs = np.frombuffer(response.raw_outputs, dtype="<f4")
    expected = in_process(demo_repo / "recsys" / "1" / "model.pt")(items).ravel()
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-6)
    assert response.processing_time_us > 0


def test_resnet18_images_by_metadata(
    demo_stub: Any, seed: SimpleNamespace, demo_repo: Path
) -> None:
    images = np.random.default_rng(4).standard_normal((2, 3, 224, 224), dtype=np.float32)
    request = seed.pb2.PredictRequest(
        inputs=images.ravel().tolist(), metadata={"model": "resnet18"}
    )
    response = demo_stub.Predict(request, timeout=60)
    expected = in_process(demo_repo / "resnet18" / "1" / "model.pt")(images)
    np.testing.assert_allclose(
        np.array(response.outputs).reshape(2, 1000), expected, rtol=1e-4, atol=1e-5
    )


def test_version_selection_and_default_version(repo_stub: Any, seed: SimpleNamespace) -> None:
    def ask(**metadata: str) -> list[float]:
        request = seed.pb2.PredictRequest(inputs=[1, 2, 3, 4], metadata=metadata)
        return list(repo_stub.Predict(request, timeout=10).outputs)

    assert ask(model="scale", version="1") == [2, 4, 6, 8]
    assert ask(model="scale", version="2") == [3, 6, 9, 12]
    assert ask(model="scale") == [3, 6, 9, 12]  # the highest version is the default
    assert ask() == [3, 6, 9, 12]  # and `scale` is this server's default model


@pytest.mark.parametrize(
    ("count", "message"),
    [
        (255, "expected a multiple of 256 floats (input 'features' has shape [256] per item)"),
        (257, "got 257"),
        (0, "got 0"),
    ],
)
def test_wrong_input_length_names_the_expected_multiple(
    demo_stub: Any, seed: SimpleNamespace, count: int, message: str
) -> None:
    error = _predict_error(demo_stub, seed.pb2.PredictRequest(inputs=[0.5] * count))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()


def test_unknown_model_or_version_is_not_found_listing_what_exists(
    repo_stub: Any, seed: SimpleNamespace
) -> None:
    error = _predict_error(
        repo_stub, seed.pb2.PredictRequest(inputs=[1, 2, 3, 4], metadata={"model": "nope"})
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "'nope'" in error.details() and "['busy', 'poisoned', 'scale']" in error.details()

    # Digits that are not ASCII digits are no version number (they used to crash: INTERNAL).
    for version in ("7", "latest", "\u00b2", "\u0661"):
        request = seed.pb2.PredictRequest(
            inputs=[1, 2, 3, 4], metadata={"model": "scale", "version": version}
        )
        error = _predict_error(repo_stub, request)
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert f"version '{version}'" in error.details() and "[1, 2]" in error.details()


def test_raw_input_errors(demo_server: Any) -> None:
    from torchwire._proto.modelservice_messages_pb2 import PredictRequest, PredictResponse

    with grpc.insecure_channel(demo_server.target) as channel:
        predict = channel.unary_unary(
            "/ModelService/Predict",
            request_serializer=PredictRequest.SerializeToString,
            response_deserializer=PredictResponse.FromString,
        )
        cases = {
            "set either inputs or raw_inputs, not both": PredictRequest(
                inputs=[1.0] * 256, raw_inputs=b"\0" * 1024
            ),
            "raw_inputs holds 1023 bytes, not a multiple of 4": PredictRequest(
                raw_inputs=b"\0" * 1023
            ),
            "expected a multiple of 256 floats": PredictRequest(raw_inputs=b"\0" * 1020),
        }
        for message, request in cases.items():
            with pytest.raises(grpc.RpcError) as caught:
                predict(request, timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in caught.value.details()


def test_a_model_that_raises_fails_only_its_own_request(
    repo_stub: Any, seed: SimpleNamespace
) -> None:
    def request(values: list[float]) -> Any:
        return seed.pb2.PredictRequest(inputs=values, metadata={"model": "poisoned"})

    # 15 good requests and one poisoned one, sent together so that they share batches.
    calls = [repo_stub.Predict.future(request([i, 1, 1, 1])) for i in range(15)]
    calls.insert(7, repo_stub.Predict.future(request([666, 1, 1, 1])))
    outcomes = []
    for call in calls:
        try:
            outcomes.append(list(call.result(timeout=30).outputs))
        except grpc.RpcError as error:
            outcomes.append(error)
    failed = [o for o in outcomes if isinstance(o, grpc.RpcError)]
    assert len(failed) == 1 and outcomes[7] is failed[0]
    assert failed[0].code() == grpc.StatusCode.INTERNAL
    assert "poisoned input: 666" in failed[0].details()
    assert "Traceback" not in failed[0].details()
    good = [o for o in outcomes if not isinstance(o, grpc.RpcError)]
    assert good == [[float(i + 3)] for i in range(15)]
    # The server keeps serving.
    assert list(repo_stub.Predict(request([1, 1, 1, 1]), timeout=10).outputs) == [4.0]
