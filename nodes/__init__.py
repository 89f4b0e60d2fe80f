"""ComfyUI glue: thin node classes over the plain-torch code in ``models``."""

from . import face, face_masks, id_encoder, infinite_id, tokens, trainer
from .folders import register_model_folders

register_model_folders()

_MODULES = (tokens, trainer, face_masks, face, id_encoder, infinite_id)
NODE_CLASS_MAPPINGS = {name: cls for m in _MODULES for name, cls in m.NODE_CLASS_MAPPINGS.items()}
NODE_DISPLAY_NAME_MAPPINGS = {name: title for m in _MODULES for name, title in m.NODE_DISPLAY_NAME_MAPPINGS.items()}
