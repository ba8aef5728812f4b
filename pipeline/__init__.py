"""The petscore Beam job: read image paths, decode, score in batches, write predictions."""

from serving.tf_logs import quiet_tensorflow_logs

quiet_tensorflow_logs()  # before any module of this package imports TensorFlow
