"""Make TensorFlow's asynchronous checkpointing work with Keras 3 models.

TensorFlow's async checkpoint copies every variable to a CPU twin inside a
`tf.function`, creating the twins on the first save and assigning to them
afterwards. Keras 3's `KerasVariable._copy_trackable_to_cpu` creates a new
`tf.Variable` on every call, so the second async save fails with
"tf.function only supports singleton tf.Variables created on the first call"
(Keras 3.15, TensorFlow 2.21). `enable_keras_async_checkpoint` replaces that
method with one that creates the twin once and assigns to it later, which is
what TensorFlow's own variables do. It is applied only when a policy asks for
`async_save`, and only once.

Example:
    >>> from prefect_tensorflow.tasks.async_save import enable_keras_async_checkpoint
    >>> enable_keras_async_checkpoint()  # doctest: +SKIP
"""

from __future__ import annotations


def enable_keras_async_checkpoint() -> bool:
    """Patch `KerasVariable._copy_trackable_to_cpu` once. Returns True if it is (now) patched."""
    try:
        from keras.src.backend.tensorflow.core import Variable as KerasVariable
    except ImportError:  # another Keras layout: nothing to fix here
        return False
    if getattr(KerasVariable._copy_trackable_to_cpu, "_ptf_fixed", False):
        return True

    def _copy_trackable_to_cpu(self, object_map):
        import tensorflow as tf

        self.value._copy_trackable_to_cpu(object_map)
        if self in object_map:
            object_map[self].assign(object_map[self.value])
        else:
            object_map[self] = tf.Variable(object_map[self.value])

    _copy_trackable_to_cpu._ptf_fixed = True  # type: ignore[attr-defined]
    KerasVariable._copy_trackable_to_cpu = _copy_trackable_to_cpu
    return True
