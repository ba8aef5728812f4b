"""The petscore Beam job: read image paths, decode, score in batches, write predictions."""
