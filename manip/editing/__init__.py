"""Real-image editing: attention control (Prompt-to-Prompt), inversions, and the edit runner."""

# The inversion settings an edit uses when neither the caller nor a reused artifact names them;
# here, not in `api`, so that `manip --help` shows them without importing torch.
INVERSION_DEFAULTS = {"inversion": "null-text", "steps": 50, "guidance": 7.5}
