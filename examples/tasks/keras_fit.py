"""Keras ``model.fit`` as a ``gradclip compare`` task.

The clipper goes into the optimizer (``gradclip.keras.ClippingOptimizer``), and a Keras
callback reports each batch::

    gradclip compare --task examples/tasks/keras_fit.py:task --clipper none \\
        --sweep "global_norm:max_norm=logspace(0.1,10,5)" --clipper zclip

Keras 3 logs the running mean of the epoch's loss after each batch, not the batch's own loss;
the traces show that mean (a NaN still shows at once, so divergence is caught).
"""

from __future__ import annotations

import math

import numpy as np

from gradclip.experiments import TrainTask


def _data(seed: int, count: int):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, 16)).astype("float32")
    w = np.random.default_rng(99).normal(size=(16,)).astype("float32")  # one problem for every seed
    y = (np.tanh(x @ w) + 0.3 * np.sin(3 * x[:, 0]) > 0).astype("float32")
    return x, y


def train(clipper, seed: int, steps: int, report) -> dict[str, float]:
    """``model.fit`` for ``steps`` batches under ``clipper``; held-out accuracy and loss."""
    import keras

    from gradclip.keras import ClippingOptimizer

    keras.utils.set_random_seed(seed)
    x, y = _data(seed, 2000)
    x_test, y_test = _data(10_000 + seed, 500)
    batch = 32
    # Exactly `steps` batches in one epoch: sample them (with replacement) from the training set.
    index = np.random.default_rng(seed).integers(0, len(y), steps * batch)
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="tanh"),
                              keras.layers.Dense(32, activation="tanh"), keras.layers.Dense(1)])
    optimizer = ClippingOptimizer(keras.optimizers.SGD(0.3, momentum=0.9), clipper)
    model.compile(optimizer=optimizer, loss=keras.losses.BinaryCrossentropy(from_logits=True))

    class Report(keras.callbacks.Callback):
        def on_train_batch_end(self, batch_index, logs=None):
            report(batch_index, logs["loss"], optimizer.last_info())

    model.fit(x[index], y[index], batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=[Report()])
    logits = model.predict(x_test, verbose=0)[:, 0]
    loss = float(np.mean(np.logaddexp(0.0, logits) - y_test * logits))  # binary cross-entropy
    return {"accuracy": float(np.mean((logits > 0) == (y_test > 0.5))), "loss": loss}


task = TrainTask(
    train,
    name="keras-fit",
    metric_name="accuracy",
    steps=200,
    quick_steps=10,
    reference_loss=math.log(2),
    reference_text="predicting 1/2 (ln 2)",
    solved_at=0.9,
    description="Keras MLP, model.fit with ClippingOptimizer",
)
