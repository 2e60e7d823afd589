"""Using a trained model: the Python API (`predictor`), the ``predict`` command, example images and the web demo."""
