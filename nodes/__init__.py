"""ComfyUI glue: thin node classes over the plain-torch code in ``models``."""

from . import tokens
from .folders import register_model_folders

register_model_folders()

NODE_CLASS_MAPPINGS = {**tokens.NODE_CLASS_MAPPINGS}
NODE_DISPLAY_NAME_MAPPINGS = {**tokens.NODE_DISPLAY_NAME_MAPPINGS}
