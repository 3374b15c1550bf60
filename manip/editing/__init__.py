"""Real-image editing: attention control (Prompt-to-Prompt), inversions, and the edit runner."""
