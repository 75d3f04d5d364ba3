"""`keras_bn.from_torch`: the layer computes what the PyTorch module
computes. On the torch backend, step by step against the module itself:
outputs, input and parameter gradients, running statistics, inference. On
every backend, the weights and the inference of the converted layer."""

import keras
import numpy as np
import pytest

import keras_bn
from tests.backend import to_numpy

torch = pytest.importorskip("torch")

BACKEND = keras.backend.backend()
CHANNELS = 3
# Module, input shape of a batch, `input_shape` for `from_torch`.
CASES = {
    "1d": (lambda **k: torch.nn.BatchNorm1d(CHANNELS, **k), (16, 3), None),
    "1d_sequence": (
        lambda **k: torch.nn.BatchNorm1d(CHANNELS, **k),
        (6, 3, 5),
        (CHANNELS, None),
    ),
    "2d": (lambda **k: torch.nn.BatchNorm2d(CHANNELS, **k), (4, 3, 3, 2), None),
    "3d": (
        lambda **k: torch.nn.BatchNorm3d(CHANNELS, **k),
        (2, 3, 2, 3, 2),
        None,
    ),
}
SETTINGS = {
    "default": {},
    "cumulative": {"momentum": None},
    "no_affine": {"affine": False, "momentum": 0.3, "eps": 1e-3},
    "no_running_stats": {"track_running_stats": False},
}


def _module(case, settings):
    module = CASES[case][0](**SETTINGS[settings])
    rng = np.random.default_rng(0)
    with torch.no_grad():
        if module.affine:
            module.weight.copy_(torch.tensor(rng.uniform(0.5, 2.0, CHANNELS)))
            module.bias.copy_(torch.tensor(rng.normal(size=CHANNELS)))
        if module.track_running_stats:
            module.running_mean.copy_(torch.tensor(rng.normal(size=CHANNELS)))
            module.running_var.copy_(
                torch.tensor(rng.uniform(0.5, 2.0, CHANNELS))
            )
            module.num_batches_tracked.fill_(3)
    return module


def _batches(case, steps=3):
    rng = np.random.default_rng(1)
    shape = CASES[case][1]
    return [
        (rng.normal(size=shape) * (step + 1) + step).astype("float32")
        for step in range(steps)
    ]


@pytest.mark.skipif(BACKEND != "torch", reason="against the module itself")
@pytest.mark.parametrize("settings", list(SETTINGS))
@pytest.mark.parametrize("case", list(CASES))
def test_trains_as_the_torch_module(case, settings):
    module = _module(case, settings)
    layer = keras_bn.from_torch(module, input_shape=CASES[case][2])
    module.train()
    for step, x in enumerate(_batches(case)):
        upstream = torch.tensor(
            np.random.default_rng(step).normal(size=x.shape),
            dtype=torch.float32,
        )
        torch_x = torch.tensor(x, requires_grad=True)
        expected = module(torch_x)
        (expected * upstream).sum().backward()
        keras_x = torch.tensor(x, requires_grad=True)
        outputs = layer(keras_x, training=True)
        (outputs * upstream).sum().backward()
        pairs = [(outputs, expected), (keras_x.grad, torch_x.grad)]
        if module.affine:
            pairs += [
                (layer.gamma.value.grad, module.weight.grad),
                (layer.beta.value.grad, module.bias.grad),
            ]
            for parameter in (layer.gamma.value, layer.beta.value):
                parameter.grad = None
            module.zero_grad()
        if module.track_running_stats:
            pairs += [
                (layer.moving_mean, module.running_mean),
                (layer.moving_variance, module.running_var),
            ]
        for actual, wanted in pairs:
            np.testing.assert_allclose(
                to_numpy(actual),
                wanted.detach().numpy(),
                rtol=1e-5,
                atol=1e-5,
                err_msg=f"step {step}",
            )
    module.eval()
    x = _batches(case, 4)[-1]
    np.testing.assert_allclose(
        to_numpy(layer(torch.tensor(x), training=False)),
        module(torch.tensor(x)).detach().numpy(),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("settings", list(SETTINGS))
def test_converted_weights_and_inference(settings):
    """On every backend: the weights are the module's, and inference
    computes what the module's `eval` computes."""
    module = _module("2d", settings).eval()
    layer = keras_bn.from_torch(module)
    assert layer.axis == 1
    assert layer.bessel_correction
    if module.affine:
        np.testing.assert_array_equal(
            to_numpy(layer.gamma), module.weight.detach().numpy()
        )
    if module.track_running_stats:
        np.testing.assert_array_equal(
            to_numpy(layer.moving_variance), module.running_var.numpy()
        )
    if module.momentum is None:
        assert layer.moving_average == "cumulative"
        np.testing.assert_array_equal(to_numpy(layer.moving_weight), 3.0)
    else:
        assert layer.momentum == pytest.approx(1.0 - module.momentum)
    x = _batches("2d")[1]
    np.testing.assert_allclose(
        to_numpy(layer(x, training=False)),
        module(torch.tensor(x)).detach().numpy(),
        rtol=1e-5,
        atol=1e-5,
    )


def test_from_a_state_dict_without_the_module():
    module = _module("2d", "cumulative")
    state = {k: v.numpy() for k, v in module.state_dict().items()}
    layer = keras_bn.from_torch(
        "BatchNorm2d", state_dict=state, num_features=CHANNELS, momentum=None
    )
    reference = keras_bn.from_torch(module)
    for mine, theirs in zip(layer.weights, reference.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(mine), to_numpy(theirs))
    assert layer.get_config() == {
        **reference.get_config(),
        "name": layer.name,
    }


def test_sync_batch_norm_is_synchronized():
    module = torch.nn.SyncBatchNorm(CHANNELS, eps=1e-4)
    layer = keras_bn.from_torch(module)
    assert layer.synchronized is True
    assert layer.epsilon == pytest.approx(1e-4)
    assert tuple(layer.input_spec.axes) == (1,)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: keras_bn.from_torch(torch.nn.LayerNorm(3)), "LayerNorm"),
        (lambda: keras_bn.from_torch("GroupNorm", num_features=3), "GroupNorm"),
        (
            lambda: keras_bn.from_torch("BatchNorm2d", state_dict={}, eps=1e-5),
            "num_features",
        ),
        (
            lambda: keras_bn.from_torch(
                "BatchNorm2d", state_dict={}, num_features=3
            ),
            "lacks",
        ),
        (
            lambda: keras_bn.from_torch(
                torch.nn.BatchNorm2d(3), input_shape=(4, None, None)
            ),
            "input_shape=",
        ),
    ],
    ids=["module", "class_name", "arguments", "state", "input_shape"],
)
def test_invalid_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
