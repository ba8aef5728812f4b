"""The cats-vs-dogs classifier: architecture, training, export, evaluation and the preprocessing
function that training and scoring share."""

from serving.tf_logs import quiet_tensorflow_logs

quiet_tensorflow_logs()  # before any module of this package imports TensorFlow
