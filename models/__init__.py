"""Plain-torch core of IDFuse: no ComfyUI imports in this package."""
