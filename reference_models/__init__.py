"""cmoe.reference_models — recipes built on cmoe: `cmoe.reference_models.unimed`, the Uni-Med reproduction
(data, model assembly, training, evaluation with the paper's metrics, the tug-of-war analysis).
"""

if __name__ != "cmoe.reference_models":  # a bare `reference_models` (repository root on sys.path): see
    import runpy                         # cmoe/source_folders.py

    runpy.run_path(f"{__path__[0]}/../cmoe/source_folders.py")["hand_over"](__name__)
