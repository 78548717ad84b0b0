"""The model registry and checkpoints: weights_only loading, class maps checked."""

import importlib.util
import io

import pytest
import torch

from tsgd_ray.core.models import MODELS, ModelError, build_model, checkpoint_bytes, has_batchnorm, load_checkpoint

CLASSES = ["a", "b", "c"]


def needs(name):
    if not name.startswith("mini_") and importlib.util.find_spec("torchvision") is None:
        pytest.skip(f"{name} needs torchvision (the 'vision' extra)")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_maps_clips_to_logits(name):
    needs(name)
    model = build_model(name, 3, (8, 32, 32), width=4, depth=3).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 8, 32, 32))
    assert logits.shape == (2, 3)
    assert has_batchnorm(model)


@pytest.mark.parametrize("name", ["mini_c3d", "mini_r2plus1d"])
@pytest.mark.parametrize("size", [(1, 16, 16), (16, 112, 112), (8, 64, 48)])
def test_mini_models_take_any_input_size(name, size):
    model = build_model(name, 5, size, width=2, depth=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 5)


def test_mini_r2plus1d_is_the_factorised_architecture():
    kernels = {
        m.kernel_size
        for m in build_model("mini_r2plus1d", 3, (8, 32, 32), width=4, depth=3).modules()
        if isinstance(m, torch.nn.Conv3d)
    }
    assert kernels == {(1, 3, 3), (3, 1, 1)}


def test_unknown_model_names_list_the_registry():
    with pytest.raises(ModelError, match="mini_c3d"):
        build_model("resnet9000", 3, (8, 32, 32))


def test_checkpoint_round_trip_and_class_map_checks():
    model = build_model("mini_c3d", 3, (8, 32, 32), width=4, depth=2).eval()
    data = checkpoint_bytes(model, CLASSES, {"epochs": 1})
    again = load_checkpoint(build_model("mini_c3d", 3, (8, 32, 32), width=4, depth=2).eval(), data, CLASSES)
    x = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    with pytest.raises(ModelError, match="another order"):
        load_checkpoint(build_model("mini_c3d", 3, (8, 32, 32), width=4, depth=2), data, ["b", "a", "c"])
    with pytest.raises(ModelError, match=r"missing \['d'\]"):
        load_checkpoint(build_model("mini_c3d", 3, (8, 32, 32), width=4, depth=2), data, ["a", "b", "d"])
    with pytest.raises(ModelError, match="wrong shape"):
        load_checkpoint(build_model("mini_c3d", 3, (8, 32, 32), width=8, depth=2), data, CLASSES)


def test_a_bare_state_dict_is_checked_by_its_head_size():
    model = build_model("mini_c3d", 4, (8, 32, 32), width=4, depth=2)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    with pytest.raises(ModelError, match="wrong shape"):
        load_checkpoint(build_model("mini_c3d", 3, (8, 32, 32), width=4, depth=2), buffer.getvalue(), CLASSES)
    assert load_checkpoint(
        build_model("mini_c3d", 4, (8, 32, 32), width=4, depth=2), buffer.getvalue(), CLASSES + ["d"]
    )


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoints_with_code_or_garbage_are_refused():
    buffer = io.BytesIO()
    torch.save({"state_dict": {}, "class_names": CLASSES, "payload": Payload()}, buffer)
    model = build_model("mini_c3d", 3, (8, 32, 32), width=4, depth=2)
    with pytest.raises(ModelError, match="weights_only"):
        load_checkpoint(model, buffer.getvalue(), CLASSES)
    with pytest.raises(ModelError, match="weights_only"):
        load_checkpoint(model, b"not a checkpoint at all", CLASSES)


def test_safetensors_checkpoints_carry_their_class_map():
    safetensors = pytest.importorskip("safetensors.torch")
    import json

    model = build_model("mini_c3d", 3, (8, 32, 32), width=4, depth=2)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    data = safetensors.save(state, metadata={"class_names": json.dumps(CLASSES)})
    assert load_checkpoint(build_model("mini_c3d", 3, (8, 32, 32), width=4, depth=2), data, CLASSES)
    with pytest.raises(ModelError, match="class map"):
        load_checkpoint(build_model("mini_c3d", 3, (8, 32, 32), width=4, depth=2), data, ["x", "y", "z"])
