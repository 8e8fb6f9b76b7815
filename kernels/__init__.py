"""Pure-torch math of the pack (no ComfyUI imports): see guidance.py."""
