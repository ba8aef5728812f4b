"""The serving signature every exported model carries (see ``serving.metadata``): written here,
at export; read by ``serving.runtimes``."""

from __future__ import annotations


def write_saved_model(classifier, directory: str) -> None:
    """Write ``classifier`` (a Keras model taking float pixels in [0, 255]) as the SavedModel the
    contract describes: ``serve``/``serving_default`` takes uint8 ``images``
    [batch, height, width, 3] and returns ``probabilities`` float32 [batch, classes], and, for a
    model whose outputs are a dict with an out-of-scope detector (``model.out_of_scope``), its
    ``scope_score`` float32 [batch] too (the dict's outputs, by name)."""
    import keras
    import tensorflow as tf

    height, width = classifier.input_shape[1:3]

    def serve(images):
        outputs = classifier(tf.cast(images, tf.float32), training=False)
        return dict(outputs) if isinstance(outputs, dict) else {"probabilities": outputs}

    archive = keras.export.ExportArchive()
    archive.track(classifier)
    archive.add_endpoint(
        name="serve", fn=serve,
        input_signature=[tf.TensorSpec([None, height, width, 3], tf.uint8, name="images")],
    )
    archive.write_out(directory, verbose=False)
