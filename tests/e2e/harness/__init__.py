"""Running the pack inside a real ComfyUI server, one module per job (no pytest here; the fixtures are
in ``tests/e2e/conftest.py``):

* ``locate``: whether the ComfyUI that ``comfy_env`` found is a full checkout, and whether this
  interpreter has what its server needs.
* ``dirs``: the isolated ``--base-directory`` (models, input, output, temp, user, and
  ``custom_nodes/comfyui-idfuse`` -> the pack root).
* ``process``: the server process (``main.py --cpu`` on a free loopback port, stopped with its
  whole process group) and what its log says about custom-node imports.
* ``client``: the HTTP client (queue a prompt, wait for its history, fail with the node,
  exception and traceback).
* ``workflow``: a workflow saved by the frontend converted into the API format.
* ``checkpoints``: random-weight SD1.5 and SDXL checkpoints in the real single-file layouts, the
  key complaints ComfyUI logs when loading one, and the memory available to load one.
"""
