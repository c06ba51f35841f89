"""Child process of tests/test_keras_distributed.py: Keras ``model.fit`` under tf.distribute.

Run as ``python _keras_distributed_child.py N MODE``: N logical CPU devices must be configured
before TensorFlow initialises them, so each device count runs in its own process, and each
strategy (MODE ``mirrored`` or ``multi_worker``) too. Prints one line
``RESULT <json>`` with, per case, the quantities the test compares.
"""

from __future__ import annotations

import json
import os
import socket
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["KERAS_BACKEND"] = "tensorflow"

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

DEVICES = int(sys.argv[1])
MODE = sys.argv[2]  # "mirrored" or "multi_worker"
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * DEVICES)

import keras  # noqa: E402

import gradclip  # noqa: E402
from gradclip.keras import ClippingOptimizer  # noqa: E402

NAMES = [f"/cpu:{i}" for i in range(DEVICES)]
BATCH = 8 * DEVICES
rng = np.random.default_rng(0)
X = rng.normal(size=(4 * BATCH, 6)).astype(np.float32)
Y = rng.normal(size=(4 * BATCH, 2)).astype(np.float32) * 3
WEIGHTS = [rng.normal(size=s).astype(np.float32) for s in [(6, 5), (5,), (5, 2), (2,)]]


def clippers():
    return {
        "global_norm": lambda: gradclip.GlobalNorm(0.5),
        "zclip": lambda: gradclip.ZClip(warmup_steps=2, z_thresh=0.5),
        "agc": lambda: gradclip.AGC(clip_factor=0.01),
        "adagc": lambda: gradclip.get("adagc", start_clip_steps=1, clip_ratio=1.0),
        "skip": lambda: gradclip.GlobalNorm(0.5, nonfinite="skip"),
    }


class Norms(keras.callbacks.Callback):
    def __init__(self, optimizer):
        super().__init__()
        self.watch, self.norms, self.clipped = optimizer, [], 0

    def on_train_batch_end(self, batch, logs=None):
        info = self.watch.last_info().to_dict()
        self.norms.append(info["norm"])
        self.clipped += int(info["clipped"])


def fit(strategy, name, x=X, accumulation=None, batch=BATCH, epochs=1):
    scope = strategy.scope() if strategy is not None else _null()
    with scope:
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(2)])
        model.set_weights(WEIGHTS)
        inner = keras.optimizers.SGD(0.1, momentum=0.5, gradient_accumulation_steps=accumulation)
        optimizer = ClippingOptimizer(inner, clippers()[name]())
        model.compile(optimizer=optimizer, loss="mse")
    norms = Norms(optimizer)
    model.fit(x, Y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0, callbacks=[norms])
    replicas = [
        [np.asarray(c).tolist() for c in (strategy.experimental_local_results(v.value) if strategy else [v.value])]
        for v in model.trainable_variables
    ]
    # Each replica applied its own copy of the clipped gradient to its own copy of the weights:
    # the copies agree only if every replica clipped by the same norm.
    spread = max(float(np.max(np.abs(np.asarray(c) - np.asarray(cs[0])))) for cs in replicas for c in cs)
    state_copies = [
        [np.asarray(c).tolist() for c in (strategy.experimental_local_results(v.value) if strategy else [v.value])]
        for v in optimizer._state_variables
    ]
    state_spread = max(
        [float(np.max(np.abs(np.asarray(c, np.float64) - np.asarray(cs[0], np.float64)))) for cs in state_copies for c in cs] or [0.0]
    )
    return {
        "weights": [w.tolist() for w in model.get_weights()],
        "norms": norms.norms,
        "clipped": norms.clipped,
        "spread": spread,
        "state_spread": state_spread,
        "state": optimizer.clipper_state_dict()["state"],
        "iterations": int(optimizer.iterations.numpy()),
    }


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def refused(make):
    try:
        make()
    except gradclip.InvalidArgumentError as error:
        return str(error)
    return None


out = {"devices": DEVICES, "cases": {}}
if MODE == "multi_worker":
    # One strategy per process: two in one process hand out the same collective instance keys.
    multi = tf.distribute.MultiWorkerMirroredStrategy._from_local_devices(NAMES)
    out["replicas"] = multi.num_replicas_in_sync
    out["cases"] = {name: {"one": fit(None, name), "multi_worker": fit(multi, name)} for name in ("global_norm", "zclip")}
    print("RESULT " + json.dumps(out))
    sys.exit(0)
mirrored = tf.distribute.MirroredStrategy(NAMES)
out["replicas"] = mirrored.num_replicas_in_sync
# Four devices: the scalar, adaptive and skipping cases (the others ran on two).
for name in clippers() if DEVICES == 2 else ("global_norm", "zclip", "skip"):
    x = X
    if name == "skip":  # a NaN in the last replica's share of the second batch: every replica skips
        x = X.copy()
        x[2 * BATCH - 1, 0] = np.nan
    out["cases"][name] = {"one": fit(None, name, x), "mirrored": fit(mirrored, name, x)}
# Accumulation: 2 micro-batches of BATCH/2 per step, under the strategy, against one replica on
# the whole batch without accumulation.
out["accumulation"] = {
    "one_big": fit(None, "global_norm", batch=BATCH),
    "mirrored_accumulated": fit(mirrored, "global_norm", accumulation=2, batch=BATCH // 2),
}
if DEVICES == 2:
    out["accumulation"]["zclip_one_big"] = fit(None, "zclip", batch=BATCH)
    out["accumulation"]["zclip_mirrored_accumulated"] = fit(mirrored, "zclip", accumulation=2, batch=BATCH // 2)
# Loss scaling under the strategy: LossScaleOptimizer outside, the clip sees unscaled sums.
with mirrored.scope():
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(2)])
    model.set_weights(WEIGHTS)
    scaled = keras.optimizers.LossScaleOptimizer(ClippingOptimizer(keras.optimizers.SGD(0.1, momentum=0.5), gradclip.GlobalNorm(0.5)))
    model.compile(optimizer=scaled, loss="mse")
model.fit(X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
out["loss_scaled"] = [w.tolist() for w in model.get_weights()]

def _build_under(strategy):
    with strategy.scope():
        ClippingOptimizer(keras.optimizers.SGD(0.1), gradclip.GlobalNorm(1.0))


def _apply_cross_replica(strategy):
    with strategy.scope():
        variables = [keras.Variable(np.zeros(3, np.float32))]
        optimizer = ClippingOptimizer(keras.optimizers.SGD(0.1), gradclip.GlobalNorm(1.0))
        optimizer.build(variables)
        optimizer.apply([tf.ones(3)], variables)


# Strategies gradclip cannot clip under are refused by name.
out["refused"] = {"central_storage": refused(lambda: _build_under(tf.distribute.experimental.CentralStorageStrategy()))}


class NoDevices(tf.distribute.MirroredStrategy):
    @property
    def num_replicas_in_sync(self):
        return 0


out["refused"]["no_devices"] = refused(lambda: _build_under(NoDevices(NAMES[:1])))
out["refused"]["cross_replica"] = refused(lambda: _apply_cross_replica(mirrored))
if DEVICES == 2:
    # A real parameter-server cluster, in process: one worker and one parameter server.
    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("localhost", 0))
            ports.append(probe.getsockname()[1])
    cluster = tf.train.ClusterSpec({"worker": [f"localhost:{ports[0]}"], "ps": [f"localhost:{ports[1]}"]})
    servers = [tf.distribute.Server(cluster, job_name=job, task_index=0, protocol="grpc", start=True) for job in ("worker", "ps")]
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(cluster, rpc_layer="grpc")
    out["refused"]["parameter_server"] = refused(lambda: _build_under(tf.distribute.ParameterServerStrategy(resolver)))


print("RESULT " + json.dumps(out))
