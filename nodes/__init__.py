"""ComfyUI nodes: thin node classes, one module per capability, over the plain-torch code in ``models``.
Their ComfyUI helpers (folders, model inspection, patching, files) are in ``nodes/glue``."""

from . import attention_map, encoders, faces, id_embeds, infinite_id, regions, scoring, tokens, train, training_photos
from .glue.folders import register_model_folders
from .glue.inputs import guard_numeric_inputs

register_model_folders()

_MODULES = (tokens, regions, train, training_photos, faces, encoders, infinite_id, id_embeds, scoring, attention_map)
NODE_CLASS_MAPPINGS = {name: cls for m in _MODULES for name, cls in m.NODE_CLASS_MAPPINGS.items()}
NODE_DISPLAY_NAME_MAPPINGS = {name: title for m in _MODULES for name, title in m.NODE_DISPLAY_NAME_MAPPINGS.items()}

# Every node checks its FLOAT/INT inputs (finite, inside min/max) before it runs.
for _name, _node_class in NODE_CLASS_MAPPINGS.items():
    guard_numeric_inputs(_node_class, NODE_DISPLAY_NAME_MAPPINGS[_name])
