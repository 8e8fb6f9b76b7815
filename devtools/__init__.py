"""Developer tools of the pack (not shipped: listed in .comfyignore): generators of files that are
derived from the node definitions, kept in step by tests."""
