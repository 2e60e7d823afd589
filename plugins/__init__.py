"""cmoe.plugins — the built-in pluggy plugins: vision encoders, LLMs (+ LoRA), the attachers that put a
connector into an existing Hugging Face model (`cmoe.attach`), and the tiny models the tests and demos build.
``plugin`` holds the hook implementations that register them (entry point ``builtin_plugins``); ``examples/``
holds an installable third-party plugin.
"""

if __name__ != "cmoe.plugins":  # found as a bare `plugins` (repository root on sys.path): cmoe/source_folders.py
    import runpy

    runpy.run_path(f"{__path__[0]}/../cmoe/source_folders.py")["hand_over"](__name__)
