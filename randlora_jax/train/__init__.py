"""The trainer's pieces, composed by `train.py`: config schema, build, step, loop, metrics."""
