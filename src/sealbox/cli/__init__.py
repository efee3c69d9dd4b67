"""The `sealbox` command: one module per noun, all through the SDK."""
