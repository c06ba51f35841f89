"""Keras ``model.fit`` under ``tf.distribute.MirroredStrategy`` with a gradclip clipper.

The clipper clips the gradient summed across replicas (the whole batch's), so its norm, its
decisions and its state are the same on every replica, and the result equals one device on the
whole batch. This script makes ``--devices`` logical CPU devices so it runs anywhere:

    python examples/keras_mirrored_strategy.py --devices 2 --epochs 3
"""

from __future__ import annotations

import argparse
import os


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)

    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import numpy as np
    import tensorflow as tf

    # Logical devices must be made before TensorFlow first touches the CPU (GPUs need none).
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.devices)
    import keras

    import gradclip
    from gradclip.keras import ClippingOptimizer

    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 16)).astype(np.float32)
    y = (x[:, :4].sum(axis=1) > 0).astype(np.int64)
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(args.devices)])
    with strategy.scope():
        model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(2)])
        # Accumulating 2 batches per step: the clip acts once per step, on the summed mean.
        optimizer = ClippingOptimizer(keras.optimizers.Adam(1e-2, gradient_accumulation_steps=2), gradclip.ZClip(warmup_steps=5))
        model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    history = model.fit(x, y, batch_size=64, epochs=args.epochs, verbose=0)
    info = optimizer.last_info().to_dict()
    print(f"replicas: {strategy.num_replicas_in_sync}, optimizer steps: {int(optimizer.iterations.numpy())}")
    print(f"accuracy: {history.history['accuracy'][-1]:.3f}, last norm {info['norm']:.4f} (threshold {info['threshold']:.4f})")
    print(f"clipper state: {optimizer.clipper_state_dict()['state']}")


if __name__ == "__main__":
    main()
