"""The cats-vs-dogs classifier: architecture, training, export, evaluation and the preprocessing
function that training and scoring share."""
