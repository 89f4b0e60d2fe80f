"""Command-line scripts that run outside ComfyUI (``python scripts/<name>.py``, ``accelerate launch ...``).

``host.py`` imports the pack and, when a script needs it, ComfyUI.
"""
