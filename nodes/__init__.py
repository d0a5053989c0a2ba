"""ComfyUI node wrappers around `diffo` (thin: each node calls library code). The node set arrives with the
ComfyUI-nodes issue; until then the plugin loads cleanly and registers nothing."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
