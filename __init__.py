"""ComfyUI entry point of ComfyUI-DiffO: ComfyUI imports this file by path and reads the mappings.

The codec itself lives in `diffo/` (no ComfyUI imports); `nodes/` wraps it as graph blocks; `web/` holds the
small frontend extension (figures shown on the nodes, the .diffo upload button)."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
