"""TF gloro's side of ``benchmarks/peer_tf_gloro.py``: trains 2C2F for a few epochs, times each.

Runs in the peer venv (Python 3.11, tensorflow-cpu 2.15, gloro 1.1.1; made by
``benchmarks/peer_tf_gloro_setup.sh``) and imports nothing from torchgloro: numpy, TF and
gloro only. The model, loss, metrics, optimizer and callbacks are those of the TF original's
``tools/training/train_gloro.py`` (``GloroNet(...).compile(...)``, ``fit`` with
``EpsilonScheduler`` and ``LrScheduler``), with the hyper-parameters the parent passes from
our recipe. The data are the parent's ``x.npy`` (N, 28, 28, 1) float32 and ``y.npy`` (N,)
int, trained from memory.

An epoch's seconds run from ``on_epoch_begin`` to the end of its last step: the training
steps, each with its power iterations, as on our side. ``fit(update_iterates=False)`` leaves
out ``UpdatePowerIterates``, whose convergence of the bound (eager, seconds to tens of
seconds) runs only between epochs and at the end, as our trainer's ``net.refresh()`` does.
Threads: the parent pins this process to ``--threads`` CPUs and sets ``OMP_NUM_THREADS``;
TF's intra- and inter-op pools are set to the same count here, before any op runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder holding x.npy and y.npy")
    p.add_argument("--out", required=True, help="where this worker writes its JSON record")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--power-iterations", type=int, required=True)
    p.add_argument("--epsilon", type=float, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--betas", type=float, nargs=2, required=True)
    p.add_argument("--adam-eps", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _model(tf, in_shape, num_classes):
    """The paper's 2C2F (the TF original's ``cnn_2C2F``), Keras' default Glorot init."""
    from tensorflow.keras import layers

    x = layers.Input(in_shape)
    z = layers.Conv2D(16, 4, strides=2, padding="same")(x)
    z = layers.Activation("relu")(z)
    z = layers.Conv2D(32, 4, strides=2, padding="same")(z)
    z = layers.Activation("relu")(z)
    z = layers.Flatten()(z)
    z = layers.Dense(100)(z)
    z = layers.Activation("relu")(z)
    return x, layers.Dense(num_classes)(z)


def main(argv=None) -> None:
    args = _parse(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import gloro
    from gloro import GloroNet
    from gloro.training import losses
    from gloro.training.callbacks import EpsilonScheduler, LrScheduler
    from gloro.training.metrics import clean_acc, vra

    tf.keras.utils.set_random_seed(args.seed)
    x = np.load(Path(args.data) / "x.npy")
    y = np.load(Path(args.data) / "y.npy").astype(np.int32)[:, None]
    net = GloroNet(*_model(tf, x.shape[1:], 10), args.epsilon, args.power_iterations)
    net.compile(
        loss=losses.get("sparse_crossentropy"),
        optimizer=tf.keras.optimizers.Adam(
            args.lr, beta_1=args.betas[0], beta_2=args.betas[1], epsilon=args.adam_eps
        ),
        metrics=[clean_acc, vra],
    )

    class Timer(tf.keras.callbacks.Callback):
        """Seconds from each epoch's start to the end of its last step."""

        def __init__(self) -> None:
            super().__init__()
            self._supports_tf_logs = True  # no per-step numpy conversion of the logs
            self.epoch_seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = self.last = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.last = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.epoch_seconds.append(self.last - self.t0)

    timer = Timer()
    callbacks = [EpsilonScheduler("fixed"), LrScheduler("decay_to_0.000001"), timer]
    history = net.fit(
        x,
        y,
        batch_size=args.batch_size,
        epochs=args.epochs,
        shuffle=True,
        verbose=0,
        update_iterates=False,
        callbacks=callbacks,
    )
    record = {
        "side": "tf_gloro",
        "epoch_seconds": timer.epoch_seconds,
        "train_samples": int(len(x)),
        "steps_per_epoch": -(-len(x) // args.batch_size),
        "final_loss": float(history.history["loss"][-1]),
        "binding": {
            "cpus": sorted(os.sched_getaffinity(0)),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        },
        "versions": {
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "gloro": gloro.__version__,
            "numpy": np.__version__,
        },
    }
    Path(args.out).write_text(json.dumps(record))


if __name__ == "__main__":
    main()
